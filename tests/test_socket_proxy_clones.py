"""The socket proxy's judgement of creates and network connects (autoscaler.socket_proxy.clones).

A create passes only if it equals, key for key and type for type, a clone the Compose backend would make
of a container of the same pool service; the backend's own body (backends/compose_clone.py) must pass, and
any change to it, at any level, in any spelling, must be refused with the field it changed named.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import docker
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler import clone_spec
from autoscaler.backends import base, compose_model
from autoscaler.backends.compose_clone import Clone, with_network
from autoscaler.clone_spec import clone_config, connect_body, endpoints
from autoscaler.socket_proxy.clones import CloneRefusedError, judge_connect, judge_create, same
from autoscaler.socket_proxy.strict_json import JsonRefusedError, loads_object

PROJECTS = frozenset({"stack"})
SOURCE: dict[str, Any] = {
    "Id": "a" * 64,
    "Name": "/stack-worker-fast-1",
    "Image": "sha256:" + "b" * 64,
    "Config": {
        "Hostname": "a" * 12, "Domainname": "", "User": "", "Env": ["PATH=/usr/bin", "ROLE=worker"],
        "Cmd": ["celery", "worker"], "Image": "autoscaler-stack:dev", "Volumes": None, "WorkingDir": "/app",
        "Entrypoint": None, "OnBuild": None, "StopSignal": "SIGTERM", "MacAddress": "02:42:ac:11:00:02",
        "Labels": {"com.docker.compose.project": "stack", "com.docker.compose.service": "worker-fast",
                   "com.docker.compose.container-number": "1", "com.docker.compose.version": "2.20.0",
                   "com.docker.compose.oneoff": "False", "autoscaler.pool": "fast"},
    },
    "HostConfig": {
        "Binds": None, "ContainerIDFile": "", "LogConfig": {"Type": "json-file", "Config": {"max-size": "20m"}},
        "NetworkMode": "stack_default", "PortBindings": {}, "RestartPolicy": {"Name": "unless-stopped",
        "MaximumRetryCount": 0}, "VolumeDriver": "", "VolumesFrom": None, "CapAdd": None, "CapDrop": ["NET_RAW"],
        "CgroupnsMode": "private", "IpcMode": "private", "PidMode": "", "UTSMode": "", "UsernsMode": "",
        "Privileged": False, "PublishAllPorts": False, "SecurityOpt": ["no-new-privileges:true"],
        "OomScoreAdj": 0, "PidsLimit": 64, "Ulimits": [{"Name": "nofile", "Soft": 1024, "Hard": 2048}],
        "Runtime": "runc", "Memory": 104857600, "NanoCpus": 500000000, "Devices": [], "Mounts": None,
        "MaskedPaths": ["/proc/kcore"], "ReadonlyPaths": ["/proc/sys"], "Init": True, "CgroupParent": "",
        "Tmpfs": {"/scratch": "size=1m"},
    },
    "NetworkSettings": {"Networks": {
        "stack_default": {"Aliases": ["stack-worker-fast-1", "worker-fast", "a" * 12], "Links": None},
        "stack_backend": {"Aliases": ["stack-worker-fast-1", "worker-fast", "workers"], "DriverOpts": None},
    }},
}
NAME = "stack-worker-fast-7"


def sources(*templates: dict[str, Any]) -> Any:
    def find(project: str, service: str, pool: str) -> Iterator[dict[str, Any]]:
        if (project, service, pool) != ("stack", "worker-fast", "fast"):
            return iter(())
        return iter(copy.deepcopy(list(templates)))
    return find


def backend_body(template: dict[str, Any] = SOURCE, *, image: str | None = None, number: int = 7) -> dict[str, Any]:
    """What the Compose backend sends for a clone of `template` (the same path as Cloner._create_and_start)."""
    name = f"stack-worker-fast-{number}"
    primary, others = endpoints(template, name=name)
    config = clone_config(template, pool="fast", number=number, image=image or template["Config"]["Image"])
    body = with_network(Clone(name=name, config=config, primary=primary, others=others))
    # docker-py drops the top level's nulls and sends json.dumps of the rest: as the proxy receives it.
    return loads_object(json.dumps({k: v for k, v in body.items() if v is not None}).encode())


def judge(body: dict[str, Any], *, name: str = NAME, templates: tuple[dict[str, Any], ...] = (SOURCE,)) -> Any:
    return judge_create(body, name=name, projects=PROJECTS, sources=sources(*templates))


def test_the_backends_own_create_passes_by_image_name_or_id() -> None:
    assert same(judge(backend_body()), backend_body())
    assert same(judge(backend_body(image=SOURCE["Image"])), backend_body(image=SOURCE["Image"]))


def test_a_create_matching_an_older_source_of_the_service_passes() -> None:
    newer = copy.deepcopy(SOURCE)
    newer["Id"], newer["Config"]["Env"] = "c" * 64, ["ROLE=changed"]
    assert same(judge(backend_body(), templates=(newer, SOURCE)), backend_body())


def test_clone_spec_agrees_with_the_backend_and_docker_py() -> None:
    assert (clone_spec.OWNER_LABEL, clone_spec.CLONE_LABEL, clone_spec.PROJECT_LABEL, clone_spec.SERVICE_LABEL,
            clone_spec.CONTAINER_NUMBER_LABEL, clone_spec.ONEOFF_LABEL, clone_spec.VERSION_LABEL,
            clone_spec.ROLE_LABEL) == (
        base.OWNER_LABEL, compose_model.CLONE_LABEL, compose_model.PROJECT_LABEL, compose_model.SERVICE_LABEL,
        compose_model.CONTAINER_NUMBER_LABEL, compose_model.ONEOFF_LABEL, compose_model.VERSION_LABEL,
        compose_model.ROLE_LABEL)
    api = docker.APIClient(base_url="tcp://127.0.0.1:1", version="1.41")
    endpoint = clone_spec.Endpoint("stack_backend", ("a", "b"), (("db", "database"), ("x", "x")), {"o": "1"})
    assert clone_spec.endpoint_config(endpoint) == api.create_endpoint_config(
        aliases=list(endpoint.aliases), links=list(endpoint.links), driver_opt=endpoint.driver_opts)
    api.close()


def _set(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(body)
    *parents, key = path.split(".")
    target = changed
    for part in parents:
        target = target[part]
    target[key] = value
    return changed


NETWORK_ALIASES = {"EndpointsConfig": {"stack_default": {"Aliases": ["stack-worker-fast-7", "db", "redis"]}}}
REFUSED_FIELDS = [
    ("HostConfig.Privileged", True), ("HostConfig.Binds", ["/:/host"]), ("HostConfig.CapAdd", ["ALL"]),
    ("HostConfig.CapAdd", "ALL"), ("HostConfig.Devices", [{"PathOnHost": "/dev/mem"}]),
    ("HostConfig.Mounts", [{"Type": "bind", "Source": "/"}]), ("HostConfig.VolumesFrom", ["db"]),
    ("HostConfig.VolumeDriver", "local"), ("Volumes", {"/data": {}}), ("HostConfig.PidMode", "host"),
    ("HostConfig.NetworkMode", "host"), ("HostConfig.IpcMode", "host"), ("HostConfig.UTSMode", "host"),
    ("HostConfig.UsernsMode", "host"), ("HostConfig.CgroupnsMode", "host"), ("HostConfig.Runtime", "runsc"),
    ("HostConfig.LogConfig", {"Type": "syslog", "Config": {}}), ("HostConfig.LogConfig.Type", "gelf"),
    ("HostConfig.OomScoreAdj", -1000), ("HostConfig.PidsLimit", -1), ("HostConfig.Ulimits", []),
    ("HostConfig.SecurityOpt", ["seccomp=unconfined"]), ("HostConfig.MaskedPaths", []),
    ("HostConfig.CgroupParent", "/"), ("HostConfig.Privileged", 0), ("HostConfig.OomScoreAdj", 0.0),
    ("HostConfig.OomScoreAdj", False), ("NetworkingConfig", NETWORK_ALIASES), ("Hostname", "x"),
    ("Labels.com.docker.compose.service", "db"), ("Labels.autoscaler.clone", "false"), ("Image", "alpine"),
    ("Labels.com.docker.compose.project", "other"), ("Labels.com.docker.compose.container-number", "07"),
]


@pytest.mark.parametrize(("path", "value"), REFUSED_FIELDS, ids=[f"{p}={v!r}"[:60] for p, v in REFUSED_FIELDS])
def test_a_create_that_differs_from_a_clone_anywhere_is_refused_naming_the_field(path: str, value: Any) -> None:
    if path.startswith("Labels."):
        body = backend_body()
        body["Labels"][path.removeprefix("Labels.")] = value
    else:
        body = _set(backend_body(), path, value)
    with pytest.raises(CloneRefusedError) as refused:
        judge(body)
    message = str(refused.value)
    assert path.rsplit(".", maxsplit=1)[-1] in message or "project" in message or "number" in message, message


def test_a_create_named_otherwise_is_refused() -> None:
    with pytest.raises(CloneRefusedError, match="name 'db' is not 'stack-worker-fast-7'"):
        judge(backend_body(), name="db")


def test_a_source_with_privileges_cannot_be_cloned_through_the_proxy() -> None:
    for path, value in [("HostConfig.Privileged", True), ("HostConfig.CapAdd", ["SYS_ADMIN"]),
                        ("HostConfig.Binds", ["/srv:/srv"]), ("HostConfig.SecurityOpt", ["apparmor=unconfined"])]:
        source = _set(SOURCE, path, value)
        with pytest.raises(CloneRefusedError, match="never allowed"):
            judge(backend_body(source), templates=(source,))


def test_case_variants_duplicates_and_escapes_never_reach_the_judge() -> None:
    text = json.dumps(backend_body())
    for spliced in [text.replace('"Privileged": false', '"Privileged": false, "privileged": true'),
                    text.replace('"HostConfig": {', '"HostConfig": {"Bind\\u017f": ["/:/h"], '),
                    text.replace('"LogConfig": {', '"LogConfig": {"TYPE": "syslog", ')]:
        with pytest.raises(JsonRefusedError):
            loads_object(spliced.encode())
    escaped = loads_object(text.replace('"Privileged": false', '"Privil\\u0065ged": true').encode())
    with pytest.raises(CloneRefusedError, match=r"HostConfig\.Privileged is True"):
        judge(escaped)
    upper = loads_object(text.replace('"Privileged": false', '"PRIVILEGED": true').encode())
    with pytest.raises(CloneRefusedError, match="PRIVILEGED is not in a clone"):
        judge(upper)


def _clone_inspect() -> dict[str, Any]:
    labels = backend_body()["Labels"]
    return {"Id": "d" * 64, "Name": f"/{NAME}", "Config": {"Labels": labels}}


def test_the_backends_connect_passes_and_no_other() -> None:
    clone = _clone_inspect()
    _, others = endpoints(SOURCE, name=NAME)
    body = connect_body("d" * 64, others[0])
    assert others[0].network == "stack_backend" and others[0].aliases == (NAME, "worker-fast", "workers")

    def connect(body: dict[str, Any], network: str = "stack_backend", who: dict[str, Any] = clone) -> Any:
        return judge_connect(body, network=network, clone=who, projects=PROJECTS, sources=sources(SOURCE))

    assert connect(body) == body
    with pytest.raises(CloneRefusedError, match="Aliases"):
        connect(_set(body, "EndpointConfig.Aliases", [NAME, "db"]))
    with pytest.raises(CloneRefusedError, match="not a second network"):
        connect(body, network="stack_default")
    with pytest.raises(CloneRefusedError, match="Container"):
        connect(_set(body, "Container", "db"))
    not_a_clone = copy.deepcopy(clone)
    del not_a_clone["Config"]["Labels"]["autoscaler.clone"]
    with pytest.raises(CloneRefusedError, match="only a clone"):
        connect(body, who=not_a_clone)


# -- property: whatever is changed, the judge passes the clone or says where it differs -------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(value: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    return found


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_any_change_is_refused_with_its_place_or_is_no_change(data: st.DataObject) -> None:
    body = backend_body()
    path = data.draw(st.sampled_from(_paths(body)))
    action = data.draw(st.sampled_from(["set", "delete", "recase", "add"]))
    changed = copy.deepcopy(body)
    parent = changed
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if action == "set":
        parent[key] = data.draw(_JSON)
    elif action == "delete":
        del parent[key]
    elif action == "recase":
        parent[data.draw(st.sampled_from([key.lower(), key.upper(), key.swapcase()]))] = parent.pop(key)
    else:
        parent[data.draw(st.text(min_size=1, max_size=12))] = data.draw(_JSON)
    try:
        wire = json.dumps(changed).encode()
        result = judge(loads_object(wire))
    except JsonRefusedError as exc:
        refusal = str(exc)
        assert "key" in refusal or "deeper" in refusal, refusal
        return
    except CloneRefusedError as exc:
        refusal = str(exc)
        assert refusal
        return
    assert same(result, body) and same(changed, body), (path, action)


# -- warm standbys: the one other create accepted is the clone's standby variant, and nothing else -------------

STANDBY_SOURCE: dict[str, Any] = copy.deepcopy(SOURCE)
STANDBY_SOURCE["Config"]["Cmd"] = ["celery", "-A", "core", "worker", "-Q", "fast", "-n", "worker-fast@%h"]


def standby_body(template: dict[str, Any] = STANDBY_SOURCE, *, number: int = 7) -> dict[str, Any]:
    """What the Compose backend sends for a standby of `template` (Cloner._plan_clone with standby=True)."""
    name = f"stack-worker-fast-{number}"
    primary, others = endpoints(template, name=name)
    config = clone_spec.standby_config(template, pool="fast", number=number, image=template["Config"]["Image"],
                                       name=name)
    body = with_network(Clone(name=name, config=config, primary=primary, others=others))
    return loads_object(json.dumps({k: v for k, v in body.items() if v is not None}).encode())


def test_the_backends_standby_create_passes_and_differs_from_a_clone_only_in_role_and_queue() -> None:
    body = standby_body()
    assert same(judge(body, templates=(STANDBY_SOURCE,)), body)
    plain = backend_body(STANDBY_SOURCE)
    assert body["Labels"] == {**plain["Labels"], "autoscaler.role": "standby"}
    assert body["Cmd"] == ["celery", "-A", "core", "worker", "-Q", "autoscaler.standby.stack-worker-fast-7", "-n",
                           "worker-fast@%h"]
    assert {k: v for k, v in body.items() if k not in ("Labels", "Cmd")} == {
        k: v for k, v in plain.items() if k not in ("Labels", "Cmd")
    }


@pytest.mark.parametrize(("change", "where"), [
    (lambda b: b["Cmd"].__setitem__(5, "fast"), "Cmd[5]"),  # the role label, but the pool's queue
    (lambda b: b["Cmd"].__setitem__(5, "autoscaler.standby.stack-worker-fast-8"), "Cmd[5]"),  # another's queue
    (lambda b: b["Cmd"].append("--autoscale=10,1"), "Cmd has"),
    (lambda b: b["Labels"].__setitem__("autoscaler.role", "replica"), "autoscaler.role"),
    (lambda b: b["HostConfig"].__setitem__("Memory", 1), "HostConfig.Memory"),
])
def test_a_standby_create_that_differs_otherwise_is_refused_naming_it(change: Any, where: str) -> None:
    body = standby_body()
    change(body)
    with pytest.raises(CloneRefusedError, match=where.replace("[", r"\[")):
        judge(body, templates=(STANDBY_SOURCE,))


def test_a_plain_clone_that_consumes_a_private_queue_or_claims_the_role_is_refused() -> None:
    plain = backend_body(STANDBY_SOURCE)
    plain["Labels"]["autoscaler.role"] = "standby"  # the label without the private queue
    with pytest.raises(CloneRefusedError, match=r"Cmd\[5\]"):
        judge(plain, templates=(STANDBY_SOURCE,))
    private = backend_body(STANDBY_SOURCE)
    private["Cmd"][5] = "autoscaler.standby.stack-worker-fast-7"  # the private queue without the label
    with pytest.raises(CloneRefusedError, match=r"Cmd\[5\]"):
        judge(private, templates=(STANDBY_SOURCE,))


def test_no_standby_of_a_source_whose_command_has_no_queue_argument() -> None:
    body = standby_body()
    with pytest.raises(CloneRefusedError, match=r"no standby can be made of stack-worker-fast-1: Config\.Cmd has no"):
        judge(body, templates=(SOURCE,))  # SOURCE's command is `celery worker`: it would consume every queue


def test_a_standby_is_never_the_source_of_a_clone() -> None:
    standby_container = copy.deepcopy(STANDBY_SOURCE)
    standby_container["Config"]["Labels"]["autoscaler.role"] = "standby"
    with pytest.raises(CloneRefusedError, match="has no container of pool"):
        judge(backend_body(standby_container), templates=(standby_container,))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_change_to_a_standby_create_is_refused_with_its_place_or_is_no_change(data: st.DataObject) -> None:
    body = standby_body()
    path = data.draw(st.sampled_from(_paths(body)))
    changed = copy.deepcopy(body)
    parent = changed
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = data.draw(_JSON)
    try:
        result = judge(loads_object(json.dumps(changed).encode()), templates=(STANDBY_SOURCE,))
    except (JsonRefusedError, CloneRefusedError) as exc:
        refusal = str(exc)
        assert refusal
        return
    assert same(result, body) and same(changed, body), path
