"""When the Docker daemon cannot be reached: bounded retries, then a BackendError that says where and why.

Also the router, which sends each pool to the backend its target names. The test that really stops and
restarts dockerd disrupts everyone else using the engine, so it only runs with
AUTOSCALER_TEST_RESTART_DOCKERD=1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import docker
import pytest
from dockertest import make_pool, unique_name, wait_until

from autoscaler.backends.base import BackendError
from autoscaler.backends.compose import ComposeBackend
from autoscaler.backends.docker_client import DEFAULT_RETRY_BUDGET, DockerConnection, DockerUnreachableError
from autoscaler.backends.router import BackendRouter
from autoscaler.backends.swarm import SwarmBackend

pytestmark = pytest.mark.docker

BOGUS = "unix:///nonexistent.sock"
REPO = Path(__file__).resolve().parents[2]


def test_a_missing_socket_fails_within_the_retry_budget() -> None:
    """Both backends raise DockerUnreachableError naming the socket and the likely cause, after bounded retries."""
    pool = make_pool("fast", service="worker", project="astestnowhere")
    for backend in (
        ComposeBackend(docker_connection=DockerConnection(base_url=BOGUS)),
        SwarmBackend(docker_connection=DockerConnection(base_url=BOGUS)),
    ):
        swarm_pool = make_pool("fast", service="worker", swarm=True)
        started = time.monotonic()
        with pytest.raises(DockerUnreachableError) as err:
            backend.status(swarm_pool if isinstance(backend, SwarmBackend) else pool)
        elapsed = time.monotonic() - started
        backend.close()
        assert DEFAULT_RETRY_BUDGET * 0.5 < elapsed < DEFAULT_RETRY_BUDGET + 5
        message = str(err.value)
        assert f"cannot reach the Docker daemon at {BOGUS}" in message
        assert "no such socket — is /var/run/docker.sock mounted" in message


PROBE = """
from autoscaler.backends.docker_client import DockerConnection, DockerUnreachableError
try:
    DockerConnection(retry_budget=2).ping()
    print("reachable")
except DockerUnreachableError as exc:
    print(exc)
"""


def test_a_socket_without_permission_says_so(docker_env: Any, worker_image: str) -> None:
    """In a container with the socket mounted, a user outside its group is told so; adding the group fixes it."""
    socket_path = "/var/run/docker.sock"
    site_packages = Path(docker.__file__).resolve().parents[1]
    socket_group = Path(socket_path).stat().st_gid

    def probe(*groups: int) -> str:
        output = docker_env.client.containers.run(
            worker_image, ["python", "-c", PROBE], user="65534:65534", group_add=list(groups), remove=True,
            name=unique_name("perm"), environment={"PYTHONPATH": "/src:/site"},
            volumes={
                socket_path: {"bind": socket_path, "mode": "rw"},
                str(REPO): {"bind": "/src", "mode": "ro"},
                str(site_packages): {"bind": "/site", "mode": "ro"},
            },
        )
        return str(output.decode())

    assert "permission denied — is the socket mounted and is the user in its group?" in probe()
    assert probe(socket_group).strip() == "reachable"


def test_the_router_dispatches_on_the_target_kind(docker_env: Any) -> None:
    """Compose pools reach the Compose backend; a kind with no backend configured is a clear BackendError."""
    router = BackendRouter(compose=ComposeBackend(docker_connection=DockerConnection()), swarm=None)
    try:
        compose_pool = make_pool("fast", service="worker", project=unique_name("none"))
        assert router.status(compose_pool).running == 0
        with pytest.raises(BackendError, match=r"has no container \(running or stopped\) for pool fast to clone"):
            router.check(compose_pool)
        with pytest.raises(BackendError, match="but no swarm backend is configured"):
            router.status(make_pool("sw", service="web", swarm=True))
    finally:
        router.close()


ROOT = Path(__file__).resolve().parents[2]


def _dockerd() -> int:
    return int(subprocess.run(["pgrep", "-xo", "dockerd"], capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(
    os.environ.get("AUTOSCALER_TEST_RESTART_DOCKERD") != "1",
    reason="opt-in: stops the shared dockerd; run with AUTOSCALER_TEST_RESTART_DOCKERD=1",
)
def test_the_backend_recovers_when_dockerd_restarts(compose_project: Any) -> None:
    """While dockerd is down status() fails clearly; once it is back the same backend works again."""
    project = compose_project("worker.yaml", "worker", tag="r")
    pool = make_pool("fast", service="worker", project=project.name)
    backend = ComposeBackend(docker_connection=DockerConnection(retry_budget=3))
    try:
        assert wait_until(lambda: backend.status(pool).running == 1, timeout=30, what="the worker")
        pid = _dockerd()
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=60, what="dockerd to exit")
        with pytest.raises(DockerUnreachableError, match="cannot reach the Docker daemon"):
            backend.status(pool)
        # The project's own start script brings the daemon back the way CI started it (in the background,
        # not as a child of this test), and waits until it answers.
        subprocess.run(["bash", str(ROOT / "scripts" / "docker-up.sh")], check=True, capture_output=True,
                       timeout=180)
        client = docker.from_env()
        try:
            wait_until(lambda: _answers(client), timeout=60, what="dockerd to come back")
        finally:
            client.close()
        # restart: unless-stopped brings the replica back with the daemon.
        status = wait_until(lambda: backend.status(pool).running == 1, timeout=60, what="the worker again")
        assert status
    finally:
        backend.close()


def _answers(client: docker.DockerClient) -> bool:
    try:
        return bool(client.ping())
    except docker.errors.DockerException:
        return False
