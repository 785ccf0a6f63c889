"""The socket proxy's judgement of the Swarm backend's calls (autoscaler.socket_proxy.services, judge, calls).

The calls are checked as docker-py spells them: the real SwarmBackend scales a service against a scripted
stand-in engine (a Swarm cluster is not needed to see what a client sends), and every request it made must
pass the proxy's judge with the same body forwarded. A service update passes only if it changes nothing
but `Mode.Replicated.Replicas` of a labelled pool service of one of the proxy's stacks; anything else, at
any level, in any spelling, is refused with the field named. tests/docker/test_socket_proxy_swarm.py
sends the same to the real engine.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.backends.docker_client import DockerConnection
from autoscaler.backends.swarm import SwarmBackend, replicas_only
from autoscaler.policy.model import PoolPolicy
from autoscaler.socket_proxy.calls import Context, match_call
from autoscaler.socket_proxy.clones import same
from autoscaler.socket_proxy.engine import Engine, EngineAnswer
from autoscaler.socket_proxy.judge import Forward, Judge, RefusedError
from autoscaler.socket_proxy.request import Request
from autoscaler.socket_proxy.services import MAX_REPLICAS, ServiceRefusedError, judge_update, require_service
from autoscaler.socket_proxy.strict_json import JsonRefusedError, loads_object

STACKS = frozenset({"celery"})
SERVICE_ID = "k" * 25
VERSION = 731
INFO: dict[str, Any] = {
    "ID": SERVICE_ID,
    "Version": {"Index": VERSION},
    "CreatedAt": "2026-12-04T10:00:00.000000000Z",
    "Spec": {
        "Name": "celery_worker-fast",
        "Labels": {"com.docker.stack.namespace": "celery", "com.docker.stack.image": "autoscaler-stack:dev",
                   "autoscaler.pool": "fast"},
        "TaskTemplate": {
            "ContainerSpec": {
                "Image": "autoscaler-stack:dev", "Labels": {"com.docker.stack.namespace": "celery"},
                "Command": ["celery"], "Args": ["-A", "core", "worker"], "Env": ["ROLE=worker", "DB_HOST=db"],
                "Privileges": {"CredentialSpec": None, "SELinuxContext": None}, "StopGracePeriod": 30000000000,
                "Healthcheck": {"Test": ["CMD-SHELL", "true"], "Interval": 15000000000},
                "DNSConfig": {}, "Isolation": "default",
            },
            "Resources": {"Limits": {"MemoryBytes": 1610612736}, "Reservations": {"MemoryBytes": 536870912}},
            "RestartPolicy": {"Condition": "any", "Delay": 5000000000, "MaxAttempts": 0},
            "Placement": {"Platforms": [{"Architecture": "amd64", "OS": "linux"}]},
            "Networks": [{"Target": "n" * 25, "Aliases": ["worker-fast"]}],
            "LogDriver": {"Name": "json-file", "Options": {"max-file": "5", "max-size": "20m"}},
            "ForceUpdate": 0, "Runtime": "container",
        },
        "Mode": {"Replicated": {"Replicas": 2}},
        "UpdateConfig": {"Parallelism": 1, "FailureAction": "pause", "MaxFailureRatio": 0, "Order": "stop-first"},
        "EndpointSpec": {"Mode": "dnsrr"},
    },
    "Endpoint": {"Spec": {"Mode": "dnsrr"}},
}


def wire(spec: dict[str, Any]) -> dict[str, Any]:
    """As the proxy receives a body: docker-py drops the top level's nulls and sends json.dumps of the rest."""
    return loads_object(json.dumps({k: v for k, v in spec.items() if v is not None}).encode())


def judge(body: dict[str, Any], *, info: dict[str, Any] = INFO, version: int = VERSION) -> Any:
    return judge_update(body, info=info, version=version, stacks=STACKS)


def changed(path: str, value: Any, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    body = copy.deepcopy(spec or replicas_only(INFO["Spec"], 5))
    *parents, key = path.split(".")
    target = body
    for part in parents:
        target = target[part]
    target[key] = value
    return body


# -- the update ----------------------------------------------------------------------------------------------

def test_the_backends_own_update_passes_and_is_what_is_forwarded() -> None:
    for replicas in (0, 1, 5, MAX_REPLICAS):
        body = wire(replicas_only(INFO["Spec"], replicas))
        decision = judge(body)
        assert not decision.stale and same(decision.body, body)


MOUNT = [{"Type": "bind", "Source": "/", "Target": "/host"}]
REFUSED_CHANGES = [
    ("TaskTemplate.ContainerSpec.Image", "alpine:latest"),
    ("TaskTemplate.ContainerSpec.Mounts", MOUNT),
    ("TaskTemplate.ContainerSpec.Privileges", {"CredentialSpec": None, "SELinuxContext": {"Disable": True}}),
    ("TaskTemplate.ContainerSpec.CapabilityAdd", ["CAP_SYS_ADMIN"]),
    ("TaskTemplate.ContainerSpec.User", "0"),
    ("TaskTemplate.ContainerSpec.Env", ["ROLE=worker", "DB_HOST=evil"]),
    ("TaskTemplate.ContainerSpec.Command", ["sh", "-c", "id"]),
    ("TaskTemplate.ContainerSpec.StopGracePeriod", 1),
    ("TaskTemplate.ContainerSpec.Healthcheck", {"Test": ["NONE"]}),
    ("TaskTemplate.Resources.Limits", {}),
    ("TaskTemplate.Placement", {"Constraints": ["node.role == manager"]}),
    ("TaskTemplate.Networks", []),
    ("TaskTemplate.LogDriver", {"Name": "syslog", "Options": {"syslog-address": "udp://10.0.0.1:514"}}),
    ("TaskTemplate.ForceUpdate", 1),
    ("Labels.autoscaler.pool", "cpu"),
    ("Name", "celery_db"),
    ("Mode", {"Global": {}}),
    ("Mode.Replicated.Replicas", 5.0),
    ("Mode.Replicated.Replicas", True),
    ("Mode.Replicated.Replicas", -1),
    ("Mode.Replicated.Replicas", "5"),
    ("Mode.Replicated.Replicas", MAX_REPLICAS + 1),
    ("UpdateConfig.Parallelism", 0),
    ("EndpointSpec", {"Mode": "vip", "Ports": [{"TargetPort": 22, "PublishedPort": 2222}]}),
    ("RollbackConfig", {"Parallelism": 1}),
]


@pytest.mark.parametrize(("path", "value"), REFUSED_CHANGES, ids=[f"{p}={v!r}"[:60] for p, v in REFUSED_CHANGES])
def test_every_other_change_is_refused_naming_the_field(path: str, value: Any) -> None:
    if path.startswith("Labels."):
        body = replicas_only(INFO["Spec"], 5)
        body["Labels"] = {**body["Labels"], path.removeprefix("Labels."): value}
    else:
        body = changed(path, value)
    with pytest.raises(ServiceRefusedError) as refused:
        judge(wire(body))
    message = str(refused.value)
    field = path.rsplit(".", maxsplit=1)[-1] if not path.startswith("Labels.") else "Labels.autoscaler.pool"
    assert field in message, message


def test_a_missing_field_is_refused_naming_it() -> None:
    body = copy.deepcopy(replicas_only(INFO["Spec"], 5))
    del body["TaskTemplate"]["ContainerSpec"]["Healthcheck"]
    with pytest.raises(ServiceRefusedError, match=r"TaskTemplate\.ContainerSpec\.Healthcheck is missing"):
        judge(wire(body))


def test_case_variants_duplicates_and_escapes() -> None:
    text = json.dumps(replicas_only(INFO["Spec"], 5))
    for spliced in [text.replace('"Mode": {', '"mode": {"Global": {}}, "Mode": {'),
                    text.replace('"Replicas": 5', '"Replicas": 5, "replicas": 500'),
                    text.replace('"Image": ', '"Mounts": [], "IMAGE": "alpine", "Image": '),
                    text.replace('"ContainerSpec": {', '"ContainerSpec": {"Mount\\u017f": [], ')]:
        with pytest.raises(JsonRefusedError):
            loads_object(spliced.encode())
    upper = loads_object(text.replace('"Image": "autoscaler-stack:dev"', '"IMAGE": "alpine"').encode())
    with pytest.raises(ServiceRefusedError, match=r"TaskTemplate\.ContainerSpec\.IMAGE is not in the service's spec"):
        judge(upper)
    escaped = loads_object(text.replace('"Image": "autoscaler-stack:dev"', '"\\u0049mage": "alpine"').encode())
    with pytest.raises(ServiceRefusedError, match=r"ContainerSpec\.Image is 'alpine', the service's is"):
        judge(escaped)


def test_only_a_labelled_pool_service_of_the_proxys_stacks() -> None:
    body = wire(replicas_only(INFO["Spec"], 5))
    outside = changed("Spec.Labels", {**INFO["Spec"]["Labels"], "com.docker.stack.namespace": "other"}, INFO)
    not_a_pool = changed("Spec.Labels", {"com.docker.stack.namespace": "celery"}, INFO)
    no_stack = changed("Spec.Labels", {"autoscaler.pool": "fast"}, INFO)
    global_mode = changed("Spec.Mode", {"Global": {}}, INFO)
    for info, reason in [(outside, "not in the proxy's Swarm stacks"), (no_stack, "not in the proxy's Swarm stacks"),
                         (not_a_pool, "not a pool's"), (global_mode, "not a replicated service"),
                         ({"ID": "x"}, "no Spec")]:
        with pytest.raises(ServiceRefusedError, match=reason):
            judge(body, info=info)
    assert require_service(not_a_pool, STACKS, pool=False)["Name"] == "celery_worker-fast"


def test_an_older_version_is_forwarded_as_the_current_spec_and_a_newer_one_refused() -> None:
    """Older: the engine answers "update out of sequence" (the backend's retry); the client's body is not sent."""
    body = wire(changed("TaskTemplate.ContainerSpec.Mounts", MOUNT))
    decision = judge(body, version=VERSION - 1)
    assert decision.stale and same(decision.body, wire(replicas_only(INFO["Spec"], 5)))
    with pytest.raises(ServiceRefusedError, match="newer than"):
        judge(wire(replicas_only(INFO["Spec"], 5)), version=VERSION + 1)
    with pytest.raises(ServiceRefusedError, match="Replicas"):
        judge(wire(changed("Mode.Replicated.Replicas", -3)), version=VERSION - 1)


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
def test_any_change_is_refused_with_its_place_or_is_only_the_count(data: st.DataObject) -> None:
    body = wire(replicas_only(INFO["Spec"], 5))
    path = data.draw(st.sampled_from(_paths(body)))
    action = data.draw(st.sampled_from(["set", "delete", "recase", "add"]))
    edited = copy.deepcopy(body)
    parent = edited
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
        decision = judge(loads_object(json.dumps(edited).encode()))
    except (JsonRefusedError, ServiceRefusedError) as exc:
        refusal = str(exc)
        assert refusal
        return
    # Passed: then it is the current spec with some count, and that is what is forwarded.
    count = edited["Mode"]["Replicated"]["Replicas"]
    assert same(decision.body, wire(replicas_only(INFO["Spec"], count))), (path, action)
    assert same(wire(edited), decision.body), (path, action)


# -- the calls as docker-py spells them, through the judge ---------------------------------------------------

class _Engine(BaseHTTPRequestHandler):
    """A scripted engine for one service: answers its inspect, its tasks and updates; records every request."""

    seen: list[tuple[str, str, bytes]]

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.seen.append((self.command, self.path, self.rfile.read(length)))
        path = self.path.split("?")[0]
        if path.endswith("/version"):
            body: Any = {"ApiVersion": "1.41", "Version": "20.10.24"}
        elif "/services/" in path and self.command == "GET":
            body = INFO if path.rsplit("/", 1)[1] in (SERVICE_ID, "celery_worker-fast") else None
        elif path.endswith("/tasks"):
            body = []
        else:
            body = {"Warnings": None}
        data = json.dumps({"message": "no such service"} if body is None else body).encode()
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def engine() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    seen: list[tuple[str, str, bytes]] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Engine", (_Engine,), {"seen": seen}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"tcp://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def _pool() -> PoolPolicy:
    return PoolPolicy.model_validate({"name": "fast", "target": {"swarm": {"service": "celery_worker-fast"}},
                                      "queues": ["fast"], "min": 0, "max": 20,
                                      "tiers": [{"above": 100, "replicas": 1}]})


def test_the_swarm_backends_calls_pass_the_judge_as_docker_py_sends_them(
        engine: tuple[str, list[tuple[str, str, bytes]]]) -> None:
    address, seen = engine
    backend = SwarmBackend(docker_connection=DockerConnection(base_url=address))
    try:
        backend.status(_pool())
        backend.scale(_pool(), current=2, desired=5)
    finally:
        backend.close()
    judge_ = Judge(Engine(address, call_timeout=10), Context(projects=frozenset(), max_stop_seconds=60,
                                                              stacks=STACKS))
    calls = list(seen)
    names = []
    for method, target, body in calls:
        headers = {"host": "docker"} | ({"content-type": "application/json"} if body else {})
        decision = judge_.judge(Request(method, target, headers, body))
        assert isinstance(decision, Forward), (target, decision)
        names.append(decision.name)
        if body:
            assert same(json.loads(decision.body or b""), json.loads(body))
            assert decision.target == f"/v1.41/services/{SERVICE_ID}/update?version={VERSION}"
    assert names == ["version", "inspect service", "list tasks", "inspect service", "update service"]
    tasks = f"/v1.41/tasks?filters=%7B%22service%22%3A+%5B%22{SERVICE_ID}%22%5D%7D"
    assert [t for _, t, _ in calls].count(tasks) == 1


def test_a_service_that_does_not_exist_gets_the_engines_404(engine: tuple[str, list[Any]]) -> None:
    judge_ = Judge(Engine(engine[0], call_timeout=10), Context(frozenset(), 60, STACKS))
    answer = judge_.judge(Request("GET", "/v1.41/services/ghost", {"host": "docker"}, b""))
    assert isinstance(answer, EngineAnswer) and answer.status == 404


@pytest.mark.parametrize(("method", "target", "reason"), [
    ("GET", "/v1.41/services", "not an endpoint"),
    ("GET", "/v1.41/services/x?insertDefaults=true", "'insertDefaults' is not one"),
    ("POST", "/v1.41/services/create", "not an endpoint"),
    ("DELETE", "/v1.41/services/x", "not an endpoint"),
    ("GET", "/v1.41/services/x/logs", "not an endpoint"),
    ("GET", "/v1.41/nodes", "not an endpoint"),
    ("GET", "/v1.41/tasks", "'filters' is required"),
    ("GET", '/v1.41/tasks?filters={"service":["a","b"]}', "exactly one service"),
    ("GET", '/v1.41/tasks?filters={"service":["a"],"desired-state":["running"]}', "not one the autoscaler uses"),
    ("GET", '/v1.41/tasks?filters={"node":["a"]}', "not one the autoscaler uses"),
    ("POST", "/v1.41/services/x/update", "'version' is required"),
    ("POST", "/v1.41/services/x/update?version=1&registryAuthFrom=spec", "'registryAuthFrom' is not one"),
    ("POST", "/v1.41/services/x/update?version=1&rollback=previous", "'rollback' is not one"),
    ("POST", "/v1.41/services/x/update?version=-1", "not an object version"),
    ("POST", "/v1.41/services/x/update?version=01", "not an object version"),
    ("POST", "/v1.41/services/x/update?version=1&version=2", "twice"),
])
def test_other_swarm_calls_and_parameters_are_refused(method: str, target: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        match_call(method, target, Context(frozenset(), 60, STACKS))


def test_a_refused_update_reaches_no_engine(engine: tuple[str, list[tuple[str, str, bytes]]]) -> None:
    address, seen = engine
    judge_ = Judge(Engine(address, call_timeout=10), Context(frozenset(), 60, STACKS))
    body = json.dumps(changed("TaskTemplate.ContainerSpec.Image", "alpine")).encode()
    request = Request("POST", f"/v1.41/services/celery_worker-fast/update?version={VERSION}",
                      {"host": "docker", "content-type": "application/json"}, body)
    with pytest.raises(RefusedError, match=r"service update refused: .*ContainerSpec\.Image is 'alpine'"):
        judge_.judge(request)
    assert [m for m, _, _ in seen] == ["GET"]  # the proxy's own inspect, nothing else


# -- the drop from root (Swarm: no group_add in a stack file) -------------------------------------------------

DROP = """
import os, sys
from autoscaler.socket_proxy.privileges import drop_privileges
group = drop_privileges(65534, sys.argv[1])
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(os.getuid(), os.geteuid(), os.getgid(), sorted(os.getgroups()), group, status["NoNewPrivs"].strip(),
      status["CapEff"].strip())
"""


@pytest.mark.skipif(os.getuid() != 0, reason="the drop is from root")
def test_root_becomes_the_user_with_only_the_sockets_group(tmp_path: Path) -> None:
    socket_file = tmp_path / "docker.sock"
    socket_file.touch()
    os.chown(socket_file, 0, 4242)
    proc = subprocess.run([sys.executable, "-c", DROP, str(socket_file)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["65534", "65534", "65534", "[4242]", "4242", "1", "0000000000000000"]
