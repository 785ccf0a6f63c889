"""A Swarm scale-down stops idle Celery workers and lets busy ones finish (Trust boundaries II, "Also").

A real single-node swarm runs a Redis broker and four Celery workers (prefetch 1, one process each) whose
stop grace is 2 s. Two of them run tasks of 20 s, far longer than the grace. Scaling 4 -> 2 must remove the
two idle workers and kill, lose or restart none of the running tasks: lowering the replica count directly
lets Swarm choose, and it stops busy tasks too (moby#33426); the backend drains the idle ones first
(Celery warm shutdown) and lowers the count as they exit.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import docker
import pytest
import redis
from celery import Celery
from docker.types import EndpointSpec, ServiceMode
from dockertest import unique_name, wait_until

from autoscaler.backends.celery_busy import CeleryBusyProbe
from autoscaler.backends.docker_client import DockerConnection
from autoscaler.backends.swarm import SwarmBackend
from autoscaler.policy.model import Policy
from tests.docker.test_swarm_backend import swarm  # noqa: F401 - the module-scoped swarm fixture

pytestmark = pytest.mark.docker

TASK_SECONDS = 20.0
WORKER = ["celery", "-A", "tasks", "worker", "-Q", "fast", "-c", "1", "--prefetch-multiplier", "1", "-n", "w@%h",
          "-l", "info", "--without-gossip", "--without-mingle"]


@dataclass
class CeleryOnSwarm:
    client: docker.DockerClient
    broker_url: str
    workers: Any  # the worker service
    app: Celery
    redis: redis.Redis

    def running(self) -> list[dict[str, Any]]:
        return [t for t in self.workers.tasks() if t["DesiredState"] == "running" and t["Status"]["State"] == "running"]

    def hosts(self) -> set[str]:
        return {t["Status"]["ContainerStatus"]["ContainerID"][:12] for t in self.running()}

    def records(self, key: str, kind: str) -> list[str]:
        return [raw.decode().split()[0] for raw in self.redis.lrange(f"{key}:{kind}", 0, -1)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def celery_on_swarm(swarm: docker.DockerClient, worker_image: str, docker_env: Any) -> Iterator[CeleryOnSwarm]:  # noqa: F811
    network = swarm.networks.create(unique_name("drainnet"), driver="overlay", attachable=True)
    port = _free_port()
    broker = swarm.services.create(
        docker_env.redis_image, name=unique_name("broker"), networks=[network.name],
        endpoint_spec=EndpointSpec(mode="dnsrr", ports={port: (6379, "tcp", "host")}),
    )
    workers = swarm.services.create(
        worker_image, command=WORKER, name=unique_name("drainworkers"), networks=[network.name],
        labels={"autoscaler.pool": "drain"}, mode=ServiceMode("replicated", replicas=4),
        env=[f"BROKER_URL=redis://{broker.name}:6379/0", "VISIBILITY_TIMEOUT=120"],
        stop_grace_period=2_000_000_000,
    )
    url = f"redis://127.0.0.1:{port}/0"
    app = Celery("producer", broker=url)
    stack = CeleryOnSwarm(swarm, url, workers, app, redis.Redis.from_url(url))
    try:
        wait_until(lambda: _ping(stack.redis), timeout=60, what="the broker service")
        wait_until(lambda: len(_answering(app)) == 4, timeout=120, what="four Celery workers to answer")
        yield stack
    finally:
        app.close()
        for service in (workers, broker):
            service.remove()
        names = [f"com.docker.swarm.service.name={s.name}" for s in (workers, broker)]
        # The low-level list: the high-level one inspects each container and races their removal.
        wait_until(lambda: not any(swarm.api.containers(all=True, filters={"label": n}) for n in names),
                   timeout=60, what="the services' containers to be removed")
        wait_until(lambda: _removed(network), timeout=60, what="the overlay network to be removed")


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _answering(app: Celery) -> set[str]:
    return {node for reply in app.control.ping(timeout=1.0) or [] for node in reply}


def _removed(network: Any) -> bool:
    try:
        network.remove()
    except docker.errors.NotFound:
        return True
    except docker.errors.APIError:
        return False
    return True


def test_a_swarm_scale_down_removes_idle_workers_and_no_running_task(celery_on_swarm: CeleryOnSwarm) -> None:
    stack = celery_on_swarm
    key = unique_name("drain")
    for _ in range(2):
        stack.app.send_task("astest.work", args=[key, TASK_SECONDS], queue="fast")
    wait_until(lambda: len(stack.records(key, "started")) == 2, timeout=30, what="two workers to start a task")
    busy = set(stack.records(key, "started"))
    idle = stack.hosts() - busy
    assert len(busy) == 2 and len(idle) == 2

    policy = Policy.model_validate({"interval": 1, "pools": {"drain": {
        "target": {"swarm": {"service": stack.workers.name}}, "queues": ["fast"], "min": 1, "max": 4,
        "tiers": [{"above": 100, "replicas": 4}], "stop_timeout": "5m",
    }}})
    pool = policy.pools[0]
    backend = SwarmBackend(docker_connection=DockerConnection(),
                           control=CeleryBusyProbe(broker_url=stack.broker_url, timeout=3.0))
    try:
        began = time.monotonic()
        backend.scale(pool, current=4, desired=2)
        status = backend.status(pool)
        assert status.running == 2, status.detail  # victims in warm shutdown are not counted
        assert backend.drain_marks(pool), "the drain is not in the pool's state"

        def spec() -> int:
            stack.workers.reload()
            return int(stack.workers.attrs["Spec"]["Mode"]["Replicated"]["Replicas"])

        wait_until(lambda: spec() == 2 and len(stack.running()) == 2, timeout=60, what="the count to reach 2")
        drained_in = time.monotonic() - began
        assert stack.hosts() == busy, f"Swarm stopped a busy worker: left {stack.hosts()}, busy {busy}"
        wait_until(lambda: len(stack.records(key, "done")) == 2, timeout=60, what="the two tasks to finish")
        assert sorted(stack.records(key, "done")) == sorted(busy)
        assert len(stack.records(key, "started")) == 2, "a task was restarted or redelivered"
        assert drained_in < TASK_SECONDS, f"the idle workers took {drained_in:.1f}s to go"
        assert not backend.drain_marks(pool)
        failed = [t for t in stack.workers.tasks() if t["Status"]["State"] in ("failed", "rejected")]
        assert not failed, failed
    finally:
        backend.close()
