"""Warm standbys on the real engine with real Celery workers (compose/celery.yaml): one project for the module.

A standby boots consuming only its private queue, so a task published to the pool's queue stays there; once
activated (add_consumer to that worker alone) it serves the next task; idle, it returns to standby without being
stopped. A new leader that lost the record of the activation (killed after the reply, before its state write)
asks that worker and counts it as capacity. Containers never exceed max + warm.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from dockertest import COMPOSE_DIR, ComposeProject, unique_name, wait_until

from autoscaler.backends.base import BackendError
from autoscaler.backends.compose import ComposeBackend
from autoscaler.backends.compose_standby import CeleryStandbyControl, private_queue
from autoscaler.backends.docker_client import DockerConnection
from autoscaler.clone_spec import ROLE_LABEL
from autoscaler.policy.model import PoolPolicy
from autoscaler.types import StandbyPlan

pytestmark = pytest.mark.docker

CONTROL_TIMEOUT = 3.0  # generous for a loaded CI machine; production's is 1 s


def _pool(project: str) -> PoolPolicy:
    return PoolPolicy.model_validate({
        "name": "celery", "target": {"compose": {"service": "worker", "project": project}}, "queues": ["fast"],
        "min": 1, "max": 2, "warm": 1, "tiers": [{"above": 100, "replicas": 2}], "stop_timeout": "30s",
    })


@pytest.fixture(scope="module")
def stack(docker_env: Any, worker_image: str) -> Iterator[tuple[ComposeProject, str]]:
    project = ComposeProject(
        name=unique_name("w"), file=COMPOSE_DIR / "celery.yaml", client=docker_env.client,
        command=docker_env.compose, env={"WORKER_IMAGE": worker_image, "REDIS_IMAGE": docker_env.redis_image},
    )
    project.up()
    try:
        (broker,) = project.containers("redis")
        address = broker.attrs["NetworkSettings"]["Networks"][f"{project.name}_default"]["IPAddress"]
        yield project, f"redis://{address}:6379/0"
    finally:
        project.down()


def test_a_standby_takes_no_task_until_activated_then_serves_the_next(stack: tuple[ComposeProject, str]) -> None:
    project, url = stack
    pool = _pool(project.name)
    client = redis.Redis.from_url(url, socket_timeout=5)
    wait_until(client.ping, timeout=30, what="the broker")
    app = Celery("astest-client", broker=url, set_as_current=False)
    control = CeleryStandbyControl(broker_url=url, timeout=CONTROL_TIMEOUT)
    backend = ComposeBackend(docker_connection=DockerConnection(), standby_control=control)
    try:
        (first,) = project.containers("worker")
        first_node = f"celery@{first.id[:12]}"
        wait_until(lambda: app.control.ping(destination=[first_node], timeout=1.0), timeout=60, what="the worker")
        # The pool's first worker stops consuming: whoever takes the task next, it is not this one.
        app.control.cancel_consumer("fast", destination=[first_node], reply=True, timeout=5)

        backend.scale(pool, current=1, desired=1, standby=StandbyPlan(boot=1))
        (standby,) = [c for c in project.containers("worker") if c.labels.get(ROLE_LABEL) == "standby"]
        node = f"celery@{standby.id[:12]}"
        queues = wait_until(lambda: control.active_queues([node]).get(node), timeout=90, what="the standby to boot")
        assert queues == {private_queue(standby.name)}
        status = backend.status(pool)
        assert (status.running, status.standby) == (1, 1)

        key = unique_name("standby")
        app.send_task("astest.work", args=[key, 0.1], queue="fast")
        # Booted and answering, it consumes only its private queue: the task waits in the pool's queue.
        time.sleep(2.0)
        assert client.llen("fast") == 1
        assert client.llen(f"{key}:started") == 0

        backend.scale(pool, current=1, desired=2, standby=StandbyPlan(activate=1))
        done = wait_until(lambda: client.lrange(f"{key}:done", 0, -1), timeout=30, what="the task to be served")
        assert done[0].decode().split()[0] == standby.id[:12]
        assert backend.standby_marks(pool) == ((standby.id, "active"),)
        status = backend.status(pool)
        assert (status.running, status.standby) == (2, 0)

        # A new leader whose state never got the activation (killed after the reply): it asks that worker.
        leader = ComposeBackend(docker_connection=DockerConnection(), standby_control=control)
        leader.resume_standbys(pool, ())
        status = leader.status(pool)
        assert (status.running, status.standby) == (2, 0)
        assert leader.standby_marks(pool) == ((standby.id, "active"),)

        # Idle, it goes back to standby: not stopped, consuming its private queue again.
        leader.scale(pool, current=2, desired=1, standby=StandbyPlan(to_standby=1))
        assert control.active_queues([node]).get(node) == {private_queue(standby.name)}
        status = leader.status(pool)
        assert (status.running, status.standby) == (1, 1)

        # Asked for more standbys than max + warm leaves room for, the backend makes only what fits, then none.
        leader.scale(pool, current=1, desired=1, standby=StandbyPlan(boot=5))
        with pytest.raises(BackendError, match="max is 2 \\+ warm 1; not creating more"):
            leader.scale(pool, current=1, desired=1, standby=StandbyPlan(boot=1))
        present = [c for c in project.containers("worker") if c.status in ("running", "created", "restarting")]
        assert len(present) == pool.max + pool.warm
    finally:
        backend.close()  # closes the remote-control client the successor shares
        app.close()
        client.close()
