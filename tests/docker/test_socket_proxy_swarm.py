"""The socket proxy in front of a real single-node swarm: the Swarm backend's calls pass, other changes do not.

One proxy container, run as deploy/swarm-stack.yaml runs it: as root with every capability dropped but
SETUID/SETGID, becoming uid 65534 with the socket's group before it serves, serving one stack (a unique
name, given to the test's services as their com.docker.stack.namespace label). The real SwarmBackend scales
a labelled service up and down through it with no 403; a service update that changes anything else (the
image, a mount), or touches a service that is no pool's or outside the stack, gets 403 and changes
nothing; an update at an older version reaches the engine, which refuses it as out of sequence.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import docker
import pytest
from docker.types import ServiceMode
from dockertest import REPO, make_pool, remove_network, unique_name, wait_until
from test_socket_proxy import _proxy_image_tag, http
from test_swarm_backend import SLEEPER, swarm  # noqa: F401 (the fixture, with its guard on leaving)

from autoscaler.backends.docker_client import DockerConnection
from autoscaler.backends.swarm import SwarmBackend, replicas_only
from tests.docker.conftest import DockerEnv

pytestmark = pytest.mark.docker


@dataclass
class SwarmProxy:
    client: docker.DockerClient
    container: Any
    address: str
    stack: str
    pool: Any  # a labelled pool service of the stack
    plain: Any  # a service of the stack without the pool label
    outside: Any  # a labelled service of no stack the proxy serves

    def send(self, raw: bytes) -> tuple[int, str]:
        with socket.create_connection((self.address, 2375), timeout=30) as conn:
            conn.sendall(raw)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), body.decode("utf-8", "replace")

    def logs(self) -> str:
        return str(self.container.logs().decode())


@pytest.fixture(scope="module")
def proxy(swarm: docker.DockerClient, docker_env: DockerEnv, worker_image: str) -> Iterator[SwarmProxy]:  # noqa: F811
    client = swarm
    tag = _proxy_image_tag()
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        client.images.build(path=str(REPO), tag=tag, rm=True, forcerm=True, pull=False, buildargs={
            "PYTHON_IMAGE": docker_env.python_image, "PYTHON_BUILD_IMAGE": docker_env.python_build_image})
    stack = unique_name("stack")
    network = client.networks.create(unique_name("proxynet"), driver="bridge")
    services: list[Any] = []
    container = None

    def service(labels: dict[str, str], replicas: int) -> Any:
        made = client.services.create(worker_image, command=SLEEPER, name=unique_name("s"), labels=labels,
                                      mode=ServiceMode("replicated", replicas=replicas),
                                      stop_grace_period=2_000_000_000)
        services.append(made)
        return made

    try:
        pool = service({"autoscaler.pool": "proxied", "com.docker.stack.namespace": stack}, 1)
        plain = service({"com.docker.stack.namespace": stack}, 0)
        outside = service({"autoscaler.pool": "proxied", "com.docker.stack.namespace": unique_name("other")}, 0)
        container = client.containers.run(
            tag, entrypoint=["python3", "-m", "autoscaler.socket_proxy"], name=unique_name("proxy"), detach=True,
            user="0", cap_drop=["ALL"], cap_add=["SETUID", "SETGID"], read_only=True, mem_limit="64m",
            environment={"AUTOSCALER_PROXY_STACKS": stack, "AUTOSCALER_PROXY_USER": "65534"},
            volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"}},
            network=network.name, healthcheck={"test": ["NONE"]},
        )
        wait_until(lambda: "serving Compose projects" in container.logs().decode(), timeout=30,
                   what="the socket proxy to listen")
        container.reload()
        address = container.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"]
        yield SwarmProxy(client, container, address, stack, pool, plain, outside)
    finally:
        if container is not None:
            container.remove(force=True)
        remove_network(client, network.id)
        for made in services:
            made.remove()
        names = [f"com.docker.swarm.service.name={made.name}" for made in services]
        wait_until(lambda: not any(client.api.containers(all=True, filters={"label": name}) for name in names),
                   timeout=60, what="the services' task containers to be removed")


def test_the_swarm_backend_scales_up_and_down_through_the_proxy(proxy: SwarmProxy) -> None:
    """Service inspect, task list and replica updates as the backend makes them: no 403; the proxy not root."""
    backend = SwarmBackend(docker_connection=DockerConnection(base_url=f"tcp://{proxy.address}:2375"))
    pool = make_pool("proxied", service=proxy.pool.name, swarm=True)

    def settled(replicas: int) -> bool:
        status = backend.status(pool)
        return status.ready and status.running == replicas and status.wanted == replicas

    try:
        backend.check(pool)
        wait_until(lambda: settled(1), timeout=90, what="1 task")
        backend.scale(pool, current=1, desired=2)
        wait_until(lambda: settled(2), timeout=90, what="2 tasks")
        backend.scale(pool, current=2, desired=1)
        wait_until(lambda: settled(1), timeout=90, what="1 task again")
    finally:
        backend.close()
    logs = proxy.logs()
    refusals = [line for line in logs.splitlines() if " 403 " in line]
    assert not refusals, refusals
    gid = os.stat("/var/run/docker.sock").st_gid
    assert f"running as uid 65534, groups [{gid}]" in logs, logs


def _update(proxy: SwarmProxy, service: Any, spec: dict[str, Any], version: int | None = None) -> tuple[int, str]:
    service.reload()
    at = service.attrs["Version"]["Index"] if version is None else version
    body = json.dumps({k: v for k, v in spec.items() if v is not None}).encode()
    return proxy.send(http("POST", f"/v1.41/services/{service.id}/update?version={at}", body))


def test_every_other_service_change_is_refused_and_changes_nothing(proxy: SwarmProxy) -> None:
    proxy.pool.reload()
    before = proxy.pool.attrs
    spec = replicas_only(before["Spec"], 1)
    image = json.loads(json.dumps(spec))
    image["TaskTemplate"]["ContainerSpec"]["Image"] = "autoscaler-local/redis:7"
    mount = json.loads(json.dumps(spec))
    mount["TaskTemplate"]["ContainerSpec"]["Mounts"] = [{"Type": "bind", "Source": "/", "Target": "/host"}]
    refused = {
        "image": _update(proxy, proxy.pool, image),
        "mount": _update(proxy, proxy.pool, mount),
        "a newer version": _update(proxy, proxy.pool, spec, version=before["Version"]["Index"] + 1000),
        "no pool's": _update(proxy, proxy.plain, replicas_only(proxy.plain.attrs["Spec"], 1)),
        "outside the stack": _update(proxy, proxy.outside, replicas_only(proxy.outside.attrs["Spec"], 1)),
        "tasks of no pool's": proxy.send(http("GET", "/v1.41/tasks?" + urllib.parse.urlencode(
            {"filters": json.dumps({"service": [proxy.plain.id]})}))),
        "inspect outside": proxy.send(http("GET", f"/v1.41/services/{proxy.outside.id}")),
        "list services": proxy.send(http("GET", "/v1.41/services")),
    }
    wrong = {what: answer for what, answer in refused.items()
             if answer[0] != 403 or not answer[1].startswith("socket proxy: ")}
    assert not wrong, wrong
    assert "ContainerSpec.Image" in refused["image"][1] and "ContainerSpec.Mounts" in refused["mount"][1], refused
    # An older version reaches the engine (as the current spec): it answers "out of sequence", nothing changes.
    stale = _update(proxy, proxy.pool, image, version=before["Version"]["Index"] - 1)
    assert stale[0] != 403 and "out of sequence" in stale[1], stale
    for service in (proxy.pool, proxy.plain, proxy.outside):
        version = service.attrs["Version"]["Index"]
        service.reload()
        assert service.attrs["Version"]["Index"] == version, service.name
    assert proxy.pool.attrs["Spec"]["TaskTemplate"]["ContainerSpec"] == before["Spec"]["TaskTemplate"]["ContainerSpec"]
