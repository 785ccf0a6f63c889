"""The socket proxy (autoscaler.socket_proxy) against the real engine: what passes, what is refused.

One proxy container for the module, run as deploy/compose.socket-proxy.yaml runs it (the autoscaler's image,
non-root with the socket's group, read-only, no capabilities), serving one Compose project
(compose/proxied.yaml: a pool service `worker` with two networks, and `db`, which is no pool's). The test
process speaks to it over a plain socket, so every byte of each request is the test's: header padding,
chunked bodies, pipelining and a body that ends late are sent as such. Every refusal is checked to have
created nothing; the real Compose backend's scale up and down pass with no refusal at all.

The last test runs the same proxy code in this process in front of a recording stand-in engine
(recording_proxy.py, which relays to the real one) to assert what bytes the engine receives.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import docker
import pytest
from dockertest import COMPOSE_DIR, REPO, ComposeProject, make_pool, remove_network, unique_name, wait_until
from recording_proxy import RecordingProxy

from autoscaler.backends.compose import ComposeBackend
from autoscaler.backends.docker_client import DockerConnection
from autoscaler.clone_spec import clone_config, connect_body, create_body, endpoints, name_separator
from autoscaler.socket_proxy.calls import Context
from autoscaler.socket_proxy.engine import Engine, request_bytes
from autoscaler.socket_proxy.judge import Judge
from autoscaler.socket_proxy.server import ProxyServer
from autoscaler.types import StandbyPlan
from tests.docker.conftest import DockerEnv

pytestmark = pytest.mark.docker

BODY_TIMEOUT = 2.0  # the proxy's (default 10 s), short so that the late-body case is quick
PROXY_INPUTS = ["Dockerfile", "pyproject.toml", "README.md", "requirements/autoscaler.lock"]


def _proxy_image_tag() -> str:
    # Tagged by content: a concurrent run from another checkout never retags this one's.
    digest = hashlib.sha256()
    files = [REPO / p for p in PROXY_INPUTS] + sorted((REPO / "autoscaler").rglob("*.py"))
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + path.read_bytes())
    return "astest-socket-proxy:" + digest.hexdigest()[:12]


@dataclass
class Proxied:
    project: ComposeProject
    container: Any
    address: str  # the proxy container's IP; port 2375

    def send(self, raw: bytes, *, rest: bytes = b"", pause: float = 0.0) -> tuple[int, str]:
        """Send `raw` (then `rest` after `pause`) on one connection; the status and body of the answer."""
        with socket.create_connection((self.address, 2375), timeout=30) as conn:
            conn.sendall(raw)
            if rest:
                time.sleep(pause)
                with contextlib.suppress(OSError):  # the proxy answered and closed already
                    conn.sendall(rest)
            answer = b""
            try:
                while chunk := conn.recv(65536):
                    answer += chunk
            except ConnectionResetError:
                pass
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), body.decode("utf-8", "replace")

    def logs(self) -> str:
        return str(self.container.logs().decode())

    def worker(self) -> dict[str, Any]:
        """The inspect of the pool service's container: the source a clone must equal."""
        running = [c for c in self.project.containers("worker") if c.status == "running"]
        info: dict[str, Any] = running[0].attrs
        return info

    def clone(self, number: int = 90) -> tuple[str, dict[str, Any]]:
        """A create the autoscaler would send for `worker`: its name and body."""
        source = self.worker()
        name = name_separator(source, self.project.name, "worker").join((self.project.name, "worker", str(number)))
        primary, _ = endpoints(source, name=name)
        config = clone_config(source, pool="proxied", number=number, image=source["Config"]["Image"])
        return name, create_body(config, primary)

    def created(self, name: str) -> bool:
        return bool(self.project.client.containers.list(all=True, filters={"name": f"^/{name}$"}))


def http(method: str, target: str, body: bytes | None = None, *, extra: str = "") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: docker\r\n{extra}"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + (body or b"")


def create(name: str, body: dict[str, Any] | bytes, *, extra: str = "") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http("POST", f"/v1.41/containers/create?name={name}", data, extra=extra)


@pytest.fixture(scope="module")
def proxied(docker_env: DockerEnv, worker_image: str) -> Iterator[Proxied]:
    client = docker_env.client
    tag = _proxy_image_tag()
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        client.images.build(path=str(REPO), tag=tag, rm=True, forcerm=True, pull=False, buildargs={
            "PYTHON_IMAGE": docker_env.python_image, "PYTHON_BUILD_IMAGE": docker_env.python_build_image})
    project = ComposeProject(name=unique_name("px"), file=COMPOSE_DIR / "proxied.yaml", client=client,
                             command=docker_env.compose, env={"WORKER_IMAGE": worker_image})
    network = client.networks.create(unique_name("proxynet"), driver="bridge")
    container = None
    try:
        project.up()
        container = client.containers.run(
            tag, entrypoint=["python3", "-m", "autoscaler.socket_proxy"], name=unique_name("proxy"),
            detach=True, user="65534", group_add=[str(os.stat("/var/run/docker.sock").st_gid)], read_only=True,
            cap_drop=["ALL"], security_opt=["no-new-privileges:true"], mem_limit="64m",
            environment={"AUTOSCALER_PROXY_PROJECTS": project.name,
                         "AUTOSCALER_PROXY_BODY_TIMEOUT": str(BODY_TIMEOUT)},
            volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"}},
            network=network.name, healthcheck={"test": ["NONE"]},
        )
        wait_until(lambda: "serving Compose projects" in container.logs().decode(), timeout=30,
                   what="the socket proxy to listen")
        container.reload()
        address = container.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"]
        yield Proxied(project, container, address)
    finally:
        if container is not None:
            container.remove(force=True)
        remove_network(client, network.id)
        project.down()


def test_the_compose_backend_scales_up_and_down_through_the_proxy(proxied: Proxied) -> None:
    """Create (with its first network), connect (the second), start, list, inspect, stop, remove: no 403."""
    backend = ComposeBackend(docker_connection=DockerConnection(base_url=f"tcp://{proxied.address}:2375"))
    pool = make_pool("proxied", service="worker", project=proxied.project.name, stop_timeout="3s")
    try:
        backend.scale(pool, current=1, desired=3)
        wait_until(lambda: len(proxied.project.running_ids("worker")) == 3, timeout=60, what="3 workers")
        clones = [c for c in proxied.project.containers("worker") if c.labels.get("autoscaler.clone") == "true"]
        assert len(clones) == 2
        assert all(set(c.attrs["NetworkSettings"]["Networks"]) == set(proxied.worker()["NetworkSettings"]["Networks"])
                   for c in clones)
        backend.scale(pool, current=3, desired=1)
        wait_until(lambda: len(proxied.project.containers("worker")) == 1, timeout=60, what="1 worker left")
    finally:
        backend.close()
    refusals = [line for line in proxied.logs().splitlines() if " 403 " in line]
    assert not refusals, refusals


def test_a_warm_standby_is_created_through_the_proxy_and_no_other_variant(proxied: Proxied) -> None:
    """The standby create (role label, private queue) passes; the same with the pool's queue kept is refused."""
    backend = ComposeBackend(docker_connection=DockerConnection(base_url=f"tcp://{proxied.address}:2375"))
    pool = make_pool("proxied", service="worker", project=proxied.project.name, stop_timeout="3s")
    pool = pool.model_copy(update={"warm": 1, "max": 1, "min": 1})
    name, body = proxied.clone(91)
    body["Labels"]["autoscaler.role"] = "standby"  # the label, but the command still consumes `fast`
    status, answer = proxied.send(create(name, body))
    assert status == 403, answer
    assert "Cmd[3]" in answer
    assert not proxied.created(name)
    try:
        backend.scale(pool, current=1, desired=1, standby=StandbyPlan(boot=1))
        (standby,) = [c for c in proxied.project.containers("worker") if c.labels.get("autoscaler.role") == "standby"]
        assert standby.attrs["Config"]["Cmd"] == ["/app/sleeper.py", "worker", "-Q",
                                                  f"autoscaler.standby.{standby.name}"]
        standby.remove(force=True)
    finally:
        backend.close()
    refusals = [line for line in proxied.logs().splitlines() if " 403 " in line and "Cmd[3] is 'fast'" not in line]
    assert not refusals, refusals


def test_the_header_padding_request_is_refused_and_creates_nothing(proxied: Proxied) -> None:
    """Issue 18: a 110,000-byte header pushed a privileged body past what HAProxy judged; the engine made it."""
    name, body = proxied.clone(91)
    body.pop("NetworkingConfig", None)  # the engine refuses one with NetworkMode host: this body it creates
    body["Env"] = [*body.get("Env", []), "PAD=" + "x" * 30_000]
    body["HostConfig"].update(Privileged=True, Binds=["/:/host"], PidMode="host", NetworkMode="host")
    status, text = proxied.send(create(name, body, extra=f"X-Padding: {'p' * 110_000}\r\n"))
    assert (status, text) == (403, "socket proxy: request head above 16 KiB refused")
    assert not proxied.created(name)


def _variants(proxied: Proxied) -> list[tuple[str, bytes]]:
    """Creates that differ from a clone of `worker` in one field each (bytes: spelled by hand)."""
    _, clone = proxied.clone(92)
    source = proxied.worker()
    text = json.dumps(clone)

    def changed(where: str, **fields: Any) -> tuple[str, bytes]:
        body = json.loads(text)
        (body["HostConfig"] if where == "host" else body).update(fields)
        return f"{where} {sorted(fields)}", json.dumps(body).encode()

    def spliced(what: str, old: str, new: str) -> tuple[str, bytes]:
        assert old in text, old
        return what, text.replace(old, new, 1).encode()

    other_cgroupns = "private" if source["HostConfig"].get("CgroupnsMode") == "host" else "host"
    networking = json.loads(text)["NetworkingConfig"]
    endpoint = next(iter(networking["EndpointsConfig"].values()))
    return [
        changed("host", Privileged=True),
        changed("host", Binds=["/:/host"]),
        changed("host", Mounts=[{"Type": "bind", "Source": "/", "Target": "/host"}]),
        changed("host", VolumesFrom=["other"]),
        changed("host", Devices=[{"PathOnHost": "/dev/mem", "PathInContainer": "/dev/mem",
                                  "CgroupPermissions": "rwm"}]),
        changed("host", CapAdd=["ALL"]),
        changed("host", CapAdd="ALL"),
        changed("host", SecurityOpt=["seccomp=unconfined"]),
        changed("host", MaskedPaths=[]),
        changed("host", PidMode="host"),
        changed("host", NetworkMode="host"),
        changed("host", IpcMode="host"),
        changed("host", UTSMode="host"),
        changed("host", UsernsMode="host"),
        changed("host", CgroupnsMode=other_cgroupns),
        changed("host", LogConfig={"Type": "syslog", "Config": {"syslog-address": "udp://10.0.0.1:514"}}),
        changed("host", LogConfig={"Type": "json-file", "Config": {}, "type": "gelf"}),
        changed("host", VolumeDriver="local"),
        changed("top", Volumes={"/data": {}}),
        changed("host", OomScoreAdj=-1000),
        changed("host", PidsLimit=-1),
        changed("host", Ulimits=[{"Name": "nofile", "Soft": 1048576, "Hard": 1048576}]),
        changed("host", Runtime="runsc"),
        changed("host", CgroupParent="/"),
        changed("top", NetworkingConfig={"EndpointsConfig": {
            net: {**endpoint, "Aliases": ["db", "redis"]} for net in networking["EndpointsConfig"]}}),
        changed("top", Labels={**clone["Labels"], "com.docker.compose.project": "stack"}),
        changed("top", Hostname="x"),
        # Case variants, duplicates and escapes: Go folds key case and takes the last duplicate.
        spliced("lowercase duplicate", '"HostConfig": {', '"HostConfig": {"privileged": true, '),
        spliced("uppercase key", '"Privileged": false', '"PRIVILEGED": true'),
        spliced("escaped key", '"Privileged": false', '"Privil\\u0065ged": true'),
        spliced("folded key", '"HostConfig": {', '"HostConfig": {"Bind\\u017f": ["/:/host"], '),
        spliced("duplicate HostConfig", '"HostConfig": {', '"HostConfig": {"Privileged": true}, "HostConfig": {'),
        spliced("nested duplicate", '"LogConfig": {', '"LogConfig": {"TYPE": "syslog", '),
        spliced("NaN", '"OomScoreAdj": 0', '"OomScoreAdj": NaN'),
        spliced("trailing data", '"Image"', '"Image'),
        ("not an object", b'["Privileged"]'),
    ]


def test_every_field_bypass_is_refused_and_creates_nothing(proxied: Proxied) -> None:
    name, _ = proxied.clone(92)
    answers = [(what, *proxied.send(create(name, body))) for what, body in _variants(proxied)]
    wrong = [(what, status, text) for what, status, text in answers
             if status != 403 or not text.startswith("socket proxy: ")]
    assert not wrong, wrong
    assert not proxied.created(name)


def test_framing_tricks_are_refused_and_create_nothing(proxied: Proxied) -> None:
    name, clone = proxied.clone(93)
    bad = json.loads(json.dumps(clone))
    bad["HostConfig"]["Privileged"] = True
    data = json.dumps(bad).encode()
    chunked = f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n"
    target = f"/v1.41/containers/create?name={name}"
    head = f"POST {target} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n"
    cases = {
        "chunked": (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunked,
        "chunked and a Content-Length": (head + f"Transfer-Encoding: chunked\r\nContent-Length: {len(chunked)}\r\n"
                                         "\r\n").encode() + chunked,
        "two Content-Lengths": (head + f"Content-Length: 2\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data,
        "obs-fold": (head + f"Content-Length: {len(data)}\r\nX-A: a\r\n b\r\n\r\n").encode() + data,
        "HTTP/1.0": (f"POST {target} HTTP/1.0\r\nHost: docker\r\nContent-Type: application/json\r\n"
                     f"Connection: keep-alive\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data,
        "pipelined": http("GET", "/_ping") + create(name, bad),
        "bare LF": create(name, bad).replace(b"Host: docker\r\n", b"Host: docker\n", 1),
    }
    answers = {what: proxied.send(raw) for what, raw in cases.items()}
    assert all(status == 403 and text.startswith("socket proxy: ") for status, text in answers.values()), answers
    raw = create(name, clone)
    split = len(raw) - 100
    late = proxied.send(raw[:split], rest=raw[split:], pause=BODY_TIMEOUT + 1)
    assert late[0] == 403 and "timed out" in late[1], late
    assert not proxied.created(name)


def test_every_other_call_and_container_is_refused(proxied: Proxied) -> None:
    db = proxied.project.containers("db")[0]
    worker = proxied.worker()
    network = f"{proxied.project.name}_backend"
    connect_db = json.dumps({"Container": db.id, "EndpointConfig": {}}).encode()
    cases = [
        ("POST", f"/v1.41/containers/{worker['Id']}/exec", b'{"Cmd": ["id"]}'),
        ("GET", f"/v1.41/containers/{worker['Id']}/archive?path=/etc", None),
        ("GET", f"/v1.41/containers/{worker['Id']}/logs?stdout=1", None),
        ("POST", "/v1.41/images/create?fromImage=alpine", None),
        ("POST", "/v1.41/build", None),
        ("GET", "/v1.41/volumes", None),
        ("GET", "/v1.41/info", None),
        ("POST", "/v1.41/swarm/init", b"{}"),
        ("POST", "/v1.41/services/x/update", b"{}"),
        ("POST", f"/v1.23/containers/{worker['Id']}/start", b'{"Privileged": true}'),
        ("GET", "/v1.023/containers/json", None),
        ("GET", "/v1.41/containers/../info", None),
        ("GET", "/v1.41/containers/a%2f..%2finfo/json", None),
        ("GET", "/v1.41/containers/json?all=1", None),  # every project's containers
        ("GET", f"/v1.41/containers/{proxied.container.id}/json", None),  # not of the project
        ("POST", f"/v1.41/containers/{worker['Id']}/start", b"{}"),
        ("POST", f"/v1.41/containers/{db.id}/start", None),
        ("POST", f"/v1.41/containers/{db.id}/stop?t=1", None),
        ("POST", f"/v1.41/containers/{worker['Id']}/stop?t=1&signal=SIGKILL", None),
        ("DELETE", f"/v1.41/containers/{db.id}?v=True&link=False&force=True", None),
        ("DELETE", f"/v1.41/containers/{worker['Id']}?v=True&link=True&force=True", None),
        ("POST", f"/v1.41/networks/{network}/connect", connect_db),
        ("POST", f"/v1.41/networks/{network}/connect",
         json.dumps({"Container": worker["Id"], "EndpointConfig": {"Aliases": ["db"]}}).encode()),
        ("GET", "/v1.41/events", None),  # unbounded
    ]
    answers = [(m, p, *proxied.send(http(m, p, b))) for m, p, b in cases]
    wrong = [a for a in answers if a[2] != 403 or not a[3].startswith("socket proxy: ")]
    assert not wrong, wrong
    db.reload()
    assert db.status == "running"
    assert proxied.project.running_ids("worker") == {worker["Id"]}


def test_the_engine_receives_only_what_the_proxy_built(proxied: Proxied) -> None:
    """In front of a recording stand-in engine: the judged body re-serialized, never the client's bytes."""
    recorder = RecordingProxy()
    server = ProxyServer(("127.0.0.1", 0), engine=Engine(recorder.url, call_timeout=60),
                         judge=Judge(Engine(recorder.url, call_timeout=60),
                                     Context(projects=frozenset({proxied.project.name}), max_stop_seconds=60)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    local = Proxied(proxied.project, proxied.container, "127.0.0.1")
    name, clone = proxied.clone(94)
    try:
        padded = json.loads(json.dumps(clone))
        padded["HostConfig"]["Privileged"] = True
        refused = [
            create(name, padded, extra=f"X-Padding: {'p' * 110_000}\r\n"),
            create(name, json.dumps(clone).replace('"Privileged": false', '"Privil\\u0065ged": true').encode()),
        ]
        for raw in refused:
            assert _send_to(local, port, raw)[0] == 403
        assert not any(b"POST" in stream for stream in recorder.streams), "a refused create reached the engine"
        # Accepted, spelled oddly (blanks, escapes, another key order): the engine gets the proxy's spelling.
        odd = json.dumps(dict(reversed(list(clone.items()))), indent=3).replace('"Image"', '"\\u0049mage"')
        status, text = _send_to(local, port, create(name, odd.encode(), extra="X-Client: mine\r\n"))
        assert status == 201, text
        posted = [bytes(s) for s in recorder.streams if s.startswith(b"POST")]
        assert posted == [request_bytes("POST", f"/v1.41/containers/create?name={name}",
                                        json.dumps(clone).encode())], posted
        created = json.loads(text)["Id"]
        _, others = endpoints(proxied.worker(), name=name)
        body = json.dumps(connect_body(created, others[0])).encode()
        status, text = _send_to(local, port, http("POST", f"/v1.41/networks/{others[0].network}/connect", body))
        assert status == 200, text
    finally:
        server.shutdown()
        server.server_close()
        recorder.close()
        proxied.project.client.api.remove_container(name, force=True, v=True)


def _send_to(proxied: Proxied, port: int, raw: bytes) -> tuple[int, str]:
    with socket.create_connection((proxied.address, port), timeout=30) as conn:
        conn.sendall(raw)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode("utf-8", "replace")
