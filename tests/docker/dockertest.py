"""Helpers for the Docker end-to-end tests: unique names, polling, Compose projects driven by the real CLI."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import docker
from celery import Celery
from docker.models.containers import Container

from autoscaler.policy.model import PoolPolicy

__all__ = [
    "COMPOSE_DIR",
    "PREFIX",
    "REPO",
    "ComposeProject",
    "cli_env",
    "compose_command",
    "make_pool",
    "publish",
    "remove_network",
    "run_cli",
    "unique_name",
    "wait_until",
]

# Every container, network, volume and Swarm service the tests create is named with this prefix.
PREFIX = "astest"
COMPOSE_DIR = Path(__file__).parent / "compose"
REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def unique_name(tag: str = "") -> str:
    return f"{PREFIX}{tag}{uuid.uuid4().hex[:8]}"


def wait_until(predicate: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll `predicate` until it returns something truthy; fail the test naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    last = predicate()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
        time.sleep(interval)
        last = predicate()
    return last


def cli_env(redis_url: str) -> dict[str, str]:
    """The environment `autoscaler` runs with in these tests: the test broker, no metrics port, text logs."""
    return {**os.environ, "AUTOSCALER_REDIS_URL": redis_url, "AUTOSCALER_METRICS_PORT": "0",
            "AUTOSCALER_LOG_FORMAT": "text"}


def run_cli(*args: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    """`autoscaler ARGS` as a process of its own, run to completion."""
    return subprocess.run([sys.executable, "-m", "autoscaler.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=cli_env(redis_url), timeout=180, check=False)


def start_controller(
    policy: Path, redis_url: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """`autoscaler run --policy POLICY ARGS` as a process of its own, its output (merged) on a text pipe."""
    return subprocess.Popen([sys.executable, "-m", "autoscaler.cli", "run", "--policy", str(policy), *args],
                            cwd=REPO, env={**cli_env(redis_url), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def publish(url: str, count: int, queue: str = "fast") -> None:
    """Publish `count` real Celery task messages to `queue`, across priorities (nobody consumes them)."""
    app = Celery("producer", broker=url)
    with app.producer_or_acquire() as producer:
        for i in range(count):
            app.send_task("tasks.noop", queue=queue, priority=i % 10, producer=producer)
    app.close()


def remove_network(client: docker.DockerClient, network_id: str, *, timeout: float = 30.0) -> None:
    """Remove a network whose containers were just removed, however the engine lags behind.

    The engine releases a removed container's endpoint asynchronously, so an immediate removal can fail with
    "has active endpoints" (seen as a teardown error on a fresh machine). Each attempt force-disconnects
    whatever the network still lists, then tries again, until it is gone or `timeout` passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            network = client.networks.get(network_id)
            network.reload()
            for container_id in (network.attrs.get("Containers") or {}):
                # Already gone: its endpoint is what the engine is still releasing.
                with contextlib.suppress(docker.errors.APIError):
                    network.disconnect(container_id, force=True)
            network.remove()
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def make_pool(
    name: str,
    *,
    service: str,
    project: str | None = None,
    swarm: bool = False,
    stop_timeout: str = "30s",
) -> PoolPolicy:
    target = {"swarm": {"service": service}} if swarm else {"compose": {"service": service, "project": project}}
    return PoolPolicy.model_validate(
        {
            "name": name,
            "target": target,
            "queues": ["fast"],
            "min": 0,
            "max": 20,
            "tiers": [{"above": 100, "replicas": 1}],
            "stop_timeout": stop_timeout,
        }
    )


def compose_command() -> list[str]:
    """`docker compose` (v2) when the plugin is there, else `docker-compose` (v1)."""
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if probe.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise RuntimeError("neither `docker compose` nor `docker-compose` is installed (scripts/docker-up.sh)")


@dataclass
class ComposeProject:
    """One Compose project under a unique name, driven by the real Compose CLI."""

    name: str
    file: Path
    client: docker.DockerClient
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*self.command, "-p", self.name, "-f", str(self.file), *args]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, **self.env}, check=False, timeout=240
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def up(self, *services: str) -> None:
        self.run("up", "-d", *services)

    def down(self) -> None:
        self.run("down", "-v", "--remove-orphans", "-t", "2", check=False)
        self.purge()

    def ps_ids(self, service: str) -> set[str]:
        """Full ids of the service's containers as the real `compose ps -q` lists them."""
        return {line.strip() for line in self.run("ps", "-q", service).stdout.splitlines() if line.strip()}

    def containers(self, service: str | None = None, *, all_states: bool = True) -> list[Container]:
        labels = [f"com.docker.compose.project={self.name}"]
        if service is not None:
            labels.append(f"com.docker.compose.service={service}")
        # ignore_removed: a container removed between the listing and its inspect (a drain ending) is gone.
        return self.client.containers.list(all=all_states, filters={"label": labels}, ignore_removed=True)

    def running_ids(self, service: str) -> set[str]:
        return {c.id for c in self.containers(service, all_states=False) if c.status == "running"}

    def purge(self) -> None:
        """Remove whatever `down` left behind (a safety net: the tests also assert `down` alone suffices)."""
        for container in self.containers():
            container.remove(force=True, v=True)
        for network in self.client.networks.list(filters={"label": f"com.docker.compose.project={self.name}"}):
            remove_network(self.client, network.id)
        for volume in self.client.volumes.list(filters={"label": f"com.docker.compose.project={self.name}"}):
            volume.remove(force=True)
