"""Graceful scale-down with real Celery workers: idle victims first, warm shutdown, redelivery after a kill."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery import Celery
from docker.models.containers import Container
from dockertest import COMPOSE_DIR, ComposeProject, make_pool, unique_name, wait_until

from autoscaler.backends.celery_busy import CeleryBusyProbe
from autoscaler.backends.compose import ComposeBackend
from autoscaler.backends.docker_client import DockerConnection
from autoscaler.policy.model import PoolPolicy

pytestmark = pytest.mark.docker

# Long enough to still run when the scale-down's own probe asks, after the test's wait for both workers to
# answer and its own probe (PROBE_TIMEOUT): 6 s left about 2 s to spare on a loaded machine. Below the
# workers' visibility timeout (compose/celery.yaml: 20 s), or a running task is delivered again.
TASK_SECONDS = 10.0
PROBE_TIMEOUT = 3.0


@dataclass
class CeleryStack:
    project: ComposeProject
    broker_url: str
    app: Celery
    redis: redis.Redis
    pool: PoolPolicy

    def workers(self) -> list[Container]:
        """Running worker containers, oldest (lowest container number) first."""
        running = [c for c in self.project.containers("worker") if c.status == "running"]
        return sorted(running, key=lambda c: int(c.labels["com.docker.compose.container-number"]))

    def answering(self) -> set[str]:
        """Hostnames of the workers that answer a broadcast ping."""
        replies = self.app.control.ping(timeout=1.0) or []
        return {node.partition("@")[2] for reply in replies for node in reply}

    def send(self, key: str) -> None:
        self.app.send_task("astest.work", args=[key, TASK_SECONDS], queue="fast")

    def records(self, key: str, kind: str) -> list[tuple[str, float]]:
        """(hostname, time) pairs the task pushed to `key:started` or `key:done`."""
        entries = [raw.decode().split() for raw in self.redis.lrange(f"{key}:{kind}", 0, -1)]
        return [(host, float(at)) for host, at in entries]


@pytest.fixture(scope="module")
def stack(docker_env: Any, worker_image: str) -> Iterator[CeleryStack]:
    """celery.yaml up: a Redis broker and one Celery worker (pool `celery`), reachable from the tests."""
    project = ComposeProject(
        name=unique_name("q"), file=COMPOSE_DIR / "celery.yaml", client=docker_env.client,
        command=docker_env.compose, env={"WORKER_IMAGE": worker_image, "REDIS_IMAGE": docker_env.redis_image},
    )
    project.up()
    try:
        (broker,) = project.containers("redis")
        address = broker.attrs["NetworkSettings"]["Networks"][f"{project.name}_default"]["IPAddress"]
        url = f"redis://{address}:6379/0"
        client = redis.Redis.from_url(url, socket_timeout=5)
        wait_until(lambda: _pings(client), timeout=30, what="the broker container to answer")
        app = Celery("astest-client", broker=url, set_as_current=False)
        yield CeleryStack(project, url, app, client, make_pool("celery", service="worker", project=project.name,
                                                                stop_timeout="30s"))
        app.close()
        client.close()
    finally:
        project.down()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def settle(stack: CeleryStack, backend: ComposeBackend, replicas: int) -> list[Any]:
    """Scale to `replicas`, wait until exactly those workers run and answer Celery pings; oldest first."""
    backend.scale(stack.pool, current=backend.status(stack.pool).running, desired=replicas)

    def settled() -> list[Any] | None:
        status = backend.status(stack.pool)
        workers = stack.workers()
        hosts = {c.id[:12] for c in workers}
        if status.ready and status.running == replicas == len(workers) and stack.answering() == hosts:
            return workers
        return None

    return wait_until(settled, timeout=90, what=f"{replicas} Celery workers to answer")


def busy_on(stack: CeleryStack, newest: Any, others: list[Any], key: str) -> None:
    """Start a task on `newest`: the other workers stop consuming the queue while it is sent."""
    nodes = [f"celery@{worker.id[:12]}" for worker in others]
    # Not `docker pause`: a paused worker's BRPOP is still queued in Redis and would get the message.
    stack.app.control.cancel_consumer("fast", destination=nodes, reply=True, timeout=5)
    try:
        stack.send(key)
        wait_until(lambda: stack.records(key, "started"), timeout=30, what="the task to start")
    finally:
        stack.app.control.add_consumer("fast", destination=nodes, reply=True, timeout=5)
    assert [host for host, _ in stack.records(key, "started")] == [newest.id[:12]]


@pytest.fixture
def backend() -> Iterator[ComposeBackend]:
    b = ComposeBackend(docker_connection=DockerConnection())
    yield b
    b.close()


def test_the_busy_probe_spares_a_worker_running_a_task(stack: CeleryStack) -> None:
    """With the busy probe, scaling 2 -> 1 stops the idle older worker, not the busy newest one."""
    # Generous for a loaded CI machine; production's default is 1 s (settings.busy_probe_timeout).
    probe = CeleryBusyProbe(broker_url=stack.broker_url, timeout=PROBE_TIMEOUT)
    backend = ComposeBackend(docker_connection=DockerConnection(), busy_probe=probe)
    try:
        oldest, newest = settle(stack, backend, 2)
        key = unique_name("spare")
        busy_on(stack, newest, [oldest], key)
        wait_until(lambda: stack.answering() == {oldest.id[:12], newest.id[:12]}, timeout=30, what="both to answer")
        assert probe(stack.pool) == {newest.id[:12]}
        started = time.monotonic()
        backend.scale(stack.pool, current=2, desired=1)
        assert time.monotonic() - started < PROBE_TIMEOUT + 2  # the probe is bounded; the stop runs later
        (survivor,) = settle(stack, backend, 1)
        assert survivor.id == newest.id
        wait_until(lambda: stack.records(key, "done"), timeout=30, what="the task to finish")
        assert [host for host, _ in stack.records(key, "done")] == [newest.id[:12]]
    finally:
        backend.close()


def test_a_busy_victim_finishes_its_task_before_it_exits(stack: CeleryStack, backend: ComposeBackend) -> None:
    """A victim stopped mid-task (warm shutdown) records its result before exiting; nothing is double-stopped."""
    oldest, newest = settle(stack, backend, 2)
    key = unique_name("warm")
    busy_on(stack, newest, [oldest], key)

    started = time.monotonic()
    backend.scale(stack.pool, current=2, desired=1)
    assert time.monotonic() - started < 3  # returns once the stop is issued
    draining = backend.status(stack.pool)
    # The draining victim no longer counts, so the pool is at its target and free to act on new work.
    assert (draining.running, draining.ready) == (1, True)
    assert "1 draining" in draining.detail
    backend.scale(stack.pool, current=draining.running, desired=1)  # a tick during the drain: no second stop

    def victim_gone() -> float | None:
        ids = {c.id for c in stack.project.containers("worker")}
        return time.time() if newest.id not in ids else None

    gone_at = wait_until(victim_gone, timeout=60, what="the victim to exit and be removed")
    done = stack.records(key, "done")
    assert [host for host, _ in done] == [newest.id[:12]]
    assert done[0][1] <= gone_at
    assert len(stack.records(key, "started")) == 1  # finished, not redelivered
    assert [c.id for c in stack.workers()] == [oldest.id]
    assert backend.status(stack.pool).ready


def test_a_killed_workers_task_is_redelivered_to_another(stack: CeleryStack, backend: ComposeBackend) -> None:
    """With acks_late a worker killed mid-task loses nothing: another one runs the task after the visibility timeout."""
    oldest, newest = settle(stack, backend, 2)
    key = unique_name("kill")
    busy_on(stack, newest, [oldest], key)
    newest.kill()

    done = wait_until(lambda: stack.records(key, "done"), timeout=90, what="the task to be redelivered and finish")
    assert [host for host, _ in done] == [oldest.id[:12]]
    assert [host for host, _ in stack.records(key, "started")] == [newest.id[:12], oldest.id[:12]]
    status = backend.status(stack.pool)
    assert status.running == 1
    assert backend.unhealthy(stack.pool).exited == 1  # killed: exit 137, reported, not counted
    newest.remove(force=True)
