"""The socket proxy (deploy/socket-proxy) against the real engine: what passes, what is refused, who reaches it.

The proxy runs as it is deployed (non-root with the socket's group, read-only, no capabilities) on an
internal network; a client container on that network plays the autoscaler and sends each request raw, so
the test sees exactly the status and reason the proxy gives. A container on another network plays a worker.
Every refused create is checked to have created nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.docker.conftest import DockerEnv
from tests.docker.dockertest import REPO, remove_network, unique_name, wait_until

pytestmark = pytest.mark.docker

# Tagged by content: a concurrent run from another checkout (another haproxy.cfg) never retags this one's.
PROXY_DIR = REPO / "deploy" / "socket-proxy"
PROXY_IMAGE = "autoscaler-socket-proxy:test-" + hashlib.sha256(
    b"".join(p.read_bytes() for p in sorted(PROXY_DIR.iterdir()))
).hexdigest()[:12]
CLONE_BODY: dict[str, Any] = json.loads((REPO / "tests" / "fixtures" / "clone-body.json").read_text())

# Runs inside the client container: sends each case as given (bytes, chunked or not) and prints the answers.
CLIENT = r"""
import base64, http.client, json, os, sys
results = []
for case in json.load(open("/cases/cases.json")):
    conn = http.client.HTTPConnection("proxy", 2375, timeout=30)
    body = base64.b64decode(case["body"]) if case["body"] is not None else None
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if case.get("chunked"):
        conn.request(case["method"], case["path"], body=iter([body]), headers=headers, encode_chunked=True)
    else:
        conn.request(case["method"], case["path"], body=body, headers=headers)
    answer = conn.getresponse()
    results.append({"status": answer.status, "text": answer.read().decode("utf-8", "replace")[:300]})
    conn.close()
print(json.dumps(results))
"""


class Proxy:
    def __init__(self, client: docker.DockerClient, python_image: str, network: str, label: str,
                 container: Any) -> None:
        self.client, self.python_image, self.network, self.label = client, python_image, network, label
        self.container = container

    def send(self, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
        wire = [
            {**case, "body": None if case.get("body") is None else base64.b64encode(
                case["body"] if isinstance(case["body"], bytes) else json.dumps(case["body"]).encode()
            ).decode()}
            for case in cases
        ]
        # Through a file: the bodies (70 KB of padding, 3,000 options) are too long for an environment.
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "cases.json").write_text(json.dumps(wire))
            os.chmod(folder, 0o755)
            output = self.client.containers.run(
                self.python_image, ["python3", "-c", CLIENT], network=self.network, remove=True, stdout=True,
                stderr=True, volumes={folder: {"bind": "/cases", "mode": "ro"}},
            )
        results: list[dict[str, Any]] = json.loads(output.decode().strip().splitlines()[-1])
        return results

    def created(self) -> list[str]:
        return [c.name for c in self.client.containers.list(all=True, filters={"label": self.label})]


@pytest.fixture(scope="module")
def proxy(docker_env: DockerEnv) -> Iterator[Proxy]:
    client = docker_env.client
    client.images.build(
        path=str(PROXY_DIR), tag=PROXY_IMAGE, rm=True,
        buildargs={"DEBIAN_IMAGE": docker_env.python_image, "DEBIAN_BUILD_IMAGE": docker_env.python_build_image},
    )
    network = client.networks.create(unique_name("proxynet"), driver="bridge", internal=True)
    container = None
    try:
        container = client.containers.run(
            PROXY_IMAGE, name=unique_name("proxy"), detach=True, user="65534",
            group_add=[str(os.stat("/var/run/docker.sock").st_gid)], read_only=True, cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"], mem_limit="64m",
            volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"}},
            network=network.name,
        )
        network.disconnect(container)
        network.connect(container, aliases=["proxy"])

        def healthy() -> bool:
            container.reload()
            return bool(container.attrs["State"].get("Health", {}).get("Status") == "healthy")

        wait_until(healthy, timeout=60, what="the socket proxy to be healthy")
        yield Proxy(client, docker_env.python_image, network.name, f"astest.proxy={network.name}", container)
    finally:
        for leftover in client.containers.list(all=True, filters={"label": f"astest.proxy={network.name}"}):
            leftover.remove(force=True)
        if container is not None:
            container.remove(force=True)
        remove_network(client, network.id)


def create(proxy: Proxy, name: str, **host_config: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(CLONE_BODY))
    body["Image"] = proxy.python_image
    body["Cmd"] = ["sleep", "60"]
    body["Labels"] = {proxy.label.split("=")[0]: proxy.label.split("=")[1]}
    body["HostConfig"].update(host_config)
    body["HostConfig"]["NetworkMode"] = "none"
    return {"method": "POST", "path": f"/v1.41/containers/create?name={name}", "body": body}


def test_the_calls_the_autoscaler_makes_pass(proxy: Proxy) -> None:
    name = unique_name("proxyclone")
    answers = proxy.send([
        {"method": "GET", "path": "/_ping"},
        {"method": "GET", "path": "/version"},
        {"method": "GET", "path": '/v1.41/containers/json?all=1&filters={"label":["x"]}'},
        {"method": "GET", "path": f"/v1.41/images/{proxy.python_image}/json"},
        {"method": "GET", "path": '/v1.41/events?since=1&until=2&filters={"event":["oom"]}'},
        create(proxy, name),
        {"method": "GET", "path": f"/v1.41/containers/{name}/json"},
        {"method": "POST", "path": f"/v1.41/containers/{name}/start"},
        {"method": "POST", "path": f"/v1.41/containers/{name}/stop?t=1"},
        {"method": "DELETE", "path": f"/v1.41/containers/{name}?v=1"},
    ])
    assert [a["status"] for a in answers] == [200, 200, 200, 200, 200, 201, 200, 204, 204, 204], answers
    assert proxy.created() == []


REFUSED_CALLS = [
    ("POST", "/v1.41/containers/{c}/exec", {"Cmd": ["id"]}, "is not an endpoint"),
    ("GET", "/v1.41/containers/{c}/archive?path=/etc", None, "is not an endpoint"),
    ("GET", "/v1.41/containers/{c}/logs?stdout=1", None, "is not an endpoint"),
    ("POST", "/v1.41/images/create?fromImage=alpine", None, "is not an endpoint"),
    ("POST", "/v1.41/build", None, "is not an endpoint"),
    ("GET", "/v1.41/volumes", None, "is not an endpoint"),
    ("GET", "/v1.41/secrets", None, "is not an endpoint"),
    ("POST", "/v1.41/swarm/init", {}, "is not an endpoint"),
    ("POST", "/v1.41/services/x/update", {}, "is not an endpoint"),
    ("GET", "/v1.41/info", None, "is not an endpoint"),
    ("POST", "/v1.41/events", None, "is not an endpoint"),
    ("PUT", "/v1.41/containers/{c}/archive?path=/", None, "is not an endpoint"),
    ("POST", "/v1.23/containers/{c}/start", {"Binds": ["/:/host"], "Privileged": True}, "below 1.24"),
    ("GET", "/v1.023/containers/json", None, "below 1.24"),  # Docker reads it as 1.23
    ("GET", "/v1.41/containers/../info", None, "path refused"),
    ("GET", "/v1.41/containers/a%2f..%2finfo/json", None, "path refused"),
    ("POST", "/v1.41/containers/{c}/start", {}, "take no body"),
]


def test_every_other_call_is_refused_with_its_reason(proxy: Proxy) -> None:
    answers = proxy.send([
        {"method": m, "path": p.format(c="proxyvictim"), "body": b} for m, p, b, _ in REFUSED_CALLS
    ])
    for (method, path, _, reason), answer in zip(REFUSED_CALLS, answers, strict=True):
        assert answer["status"] == 403 and reason in answer["text"], (method, path, answer)


def test_a_create_that_asks_for_the_host_is_refused_and_creates_nothing(proxy: Proxy) -> None:
    cases = [
        create(proxy, unique_name("p"), Privileged=True),
        create(proxy, unique_name("p"), Binds=["/:/host"]),
        create(proxy, unique_name("p"), CapAdd=["ALL"]),
        create(proxy, unique_name("p"), SecurityOpt=["seccomp=unconfined"]),
        create(proxy, unique_name("p"), PidMode="host"),
        create(proxy, unique_name("p"), MaskedPaths=[]),
        create(proxy, unique_name("p"), ReadonlyPaths=["/x"]),  # any list replaces the defaults
        create(proxy, unique_name("p"), CapAdd="ALL"),  # a plain string is a list to Docker
        create(proxy, unique_name("p"), SecurityOpt=["no-new-privileges"] * 3000 + ["seccomp=unconfined"]),
        create(proxy, unique_name("p"), PortBindings={"22/tcp": [{"HostPort": "2222"}]}),
        create(proxy, unique_name("p"), Devices=[{"PathOnHost": "/dev/mem", "PathInContainer": "/dev/mem",
                                                   "CgroupPermissions": "rwm"}]),
    ]
    escaped = create(proxy, unique_name("p"))
    escaped["body"] = json.dumps(escaped["body"]).replace(
        '"HostConfig": {', '"HostConfig": {"Privil\\u0065ged": true, ', 1).encode()
    folded = create(proxy, unique_name("p"))  # Go's decoder reads "Bind\u017f" as "Binds"
    folded["body"] = json.dumps(folded["body"]).replace(
        '"HostConfig": {', '"HostConfig": {"Bind\u017f": ["/:/host"], ', 1).encode()
    padded = create(proxy, unique_name("p"))  # the dangerous key beyond what a small buffer would hold
    padded["body"]["Env"].append("PAD=" + "x" * 70_000)
    padded["body"]["HostConfig"]["Privileged"] = True
    chunked = {**create(proxy, unique_name("p"), Privileged=True), "chunked": True}
    cases += [escaped, folded, padded, chunked]
    answers = proxy.send(cases)
    assert all(a["status"] == 403 and a["text"].startswith("socket proxy: ") for a in answers), answers
    assert proxy.created() == []


def test_a_worker_on_another_network_cannot_reach_the_proxy(proxy: Proxy, docker_env: DockerEnv) -> None:
    client = docker_env.client
    proxy.container.reload()
    address = proxy.container.attrs["NetworkSettings"]["Networks"][proxy.network]["IPAddress"]
    probe = (
        "import os, socket\n"
        "for host in ('proxy', os.environ['ADDRESS']):\n"
        "    try:\n"
        "        socket.create_connection((host, 2375), timeout=3).close(); print(host, 'REACHED')\n"
        "    except OSError as exc:\n"
        "        print(host, 'unreachable:', type(exc).__name__)\n"
    )
    worker_network = client.networks.create(unique_name("workernet"), driver="bridge")
    try:
        output = client.containers.run(
            docker_env.python_image, ["python3", "-c", probe], network=worker_network.name, remove=True,
            environment={"ADDRESS": address},
        ).decode()
    finally:
        remove_network(client, worker_network.id)
    assert "REACHED" not in output and output.count("unreachable") == 2, output


def test_the_image_carries_this_config_and_runs_as_nobody(docker_env: DockerEnv) -> None:
    text = docker_env.client.containers.run(PROXY_IMAGE, ["cat", "/etc/haproxy/haproxy.cfg"], remove=True)
    assert text.decode() == (PROXY_DIR / "haproxy.cfg").read_text()
    assert docker_env.client.images.get(PROXY_IMAGE).attrs["Config"]["User"] == "65534"


def test_http2_is_not_spoken(proxy: Proxy) -> None:
    """An HTTP/2 request needs no Content-Length: its body could not be judged whole, so only HTTP/1 is spoken."""
    script = (
        "import socket; s = socket.create_connection(('proxy', 2375), timeout=10); "
        "s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n'); print(s.recv(64)); s.close()"
    )
    output = proxy.client.containers.run(proxy.python_image, ["python3", "-c", script], network=proxy.network,
                                         remove=True).decode()
    assert "HTTP/1" in output or output.strip() == "b''", output
