"""A pool whose replicas crash at start never grows past `max`, and backs off (Trust boundaries I, defect 2).

With `restart: unless-stopped` a crashing replica is "restarting", never "running": the pool reads 0 running,
below its min of 2, and the min correction skips cooldowns. Before, every tick created two more containers
(14 for a max of 10 after five ticks). Now restarting replicas count as capacity on its way, every container
that exists counts against `max`, and a scale-up whose replicas fail backs off, saying so.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import docker
import pytest
import redis
from dockertest import unique_name

from autoscaler.backends.compose import ComposeBackend
from autoscaler.backends.docker_client import DockerConnection
from autoscaler.backends.start_backoff import StartBackoff
from autoscaler.loop import Controller
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.model import Policy
from autoscaler.policy.watch import FixedPolicy
from autoscaler.state_store import MemoryStateStore, RedisStateStore
from autoscaler.types import QueueStats
from tests.docker.conftest import ProjectFactory

pytestmark = pytest.mark.docker
MAX = 4


class EmptyQueues:
    def observe(self, queues: Sequence[str]) -> dict[str, QueueStats]:
        return {q: QueueStats(name=q, waiting=0, unacked=0, latency_s=0.0) for q in queues}

    def close(self) -> None:
        return None


def test_a_crash_looping_pool_never_exceeds_max_and_backs_off(compose_project: ProjectFactory) -> None:
    project = compose_project("crashloop.yaml", "worker", tag=unique_name("cl")[-4:])
    policy = Policy.model_validate({
        "interval": "1s",
        "pools": {"fast": {
            "target": {"compose": {"service": "worker", "project": project.name}}, "queues": ["fast"],
            "min": 2, "max": MAX, "tiers": [{"below": 10, "replicas": 2}], "stop_timeout": "2s",
        }},
    })
    metrics = Metrics()

    def on_failure(pool: str, reason: str) -> None:
        metrics.replica_failures.labels(pool, reason).inc()

    # The failed-start window is long enough for Docker's restart back-off to show the crash.
    backend = ComposeBackend(docker_connection=DockerConnection(), on_replica_failure=on_failure,
                             backoff=StartBackoff(base=30.0, window=60.0))
    controller = Controller(policies=FixedPolicy(policy), source=EmptyQueues(), backend=backend,
                            store=MemoryStateStore(), metrics=metrics)
    counts, reasons = [], []
    try:
        for _ in range(8):
            report = controller.tick()
            reasons.append(report.pools[0].decision.reason)
            counts.append(len(project.containers("worker")))
            time.sleep(1.5)
        status = backend.status(policy.pools[0])
    finally:
        backend.close()

    assert max(counts) <= MAX, f"containers per tick: {counts}"
    assert counts[-1] <= 2 + 1, f"the pool kept creating replicas: {counts}; {reasons}"
    failures: Any = metrics.replica_failures.labels("fast", "failed-start")._value.get()
    assert failures >= 1, reasons
    assert "backing off" in status.detail, status.detail
    assert any("backing off" in r or "restarting" in r for r in reasons), reasons


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clones_created(client: docker.DockerClient, project: str, since: float) -> dict[str, int]:
    """Containers the autoscaler created per service of `project` since `since`, from the daemon's events."""
    events = client.events(since=int(since) - 1, until=f"{time.time():.6f}", decode=True,
                           filters={"type": "container", "event": "create",
                                    "label": [f"com.docker.compose.project={project}", "autoscaler.clone=true"]})
    return dict(Counter(e["Actor"]["Attributes"]["com.docker.compose.service"] for e in events))


@pytest.mark.redis
def test_replicas_that_exit_0_or_cannot_start_back_off_and_a_new_leader_keeps_waiting(
    compose_project: ProjectFactory, docker_env: Any, redis_url: str
) -> None:
    """Issue 17, item 7: `quitter` exits 0 at once (restart: no) and `pinned` cannot start a second replica (its
    host port is taken). Both were removed and recreated every tick (30 creates in 135 s; 24 in 75 s), and a
    failover reset the back-off. Now each scale-up's failure backs its pool off, kept in the (Redis) state."""
    project = compose_project("failures.yaml", "pinned", "quitter", tag=unique_name("q")[-4:],
                              env={"PINNED_PORT": str(_free_port())})
    pools = {
        name: {"target": {"compose": {"service": name, "project": project.name}}, "queues": [name],
               "min": 3, "max": MAX, "tiers": [{"below": 10, "replicas": 3}], "stop_timeout": "2s"}
        for name in ("pinned", "quitter")
    }
    policy = Policy.model_validate({"interval": "1s", "pools": pools})
    since = time.time()
    metrics = Metrics()

    def leader(backoff: StartBackoff) -> tuple[Controller, ComposeBackend]:
        backend = ComposeBackend(
            docker_connection=DockerConnection(), backoff=backoff,
            on_replica_failure=lambda pool, reason: metrics.replica_failures.labels(pool, reason).inc(),
        )
        store = RedisStateStore(redis.Redis.from_url(redis_url), prefix=f"{project.name}:")
        return Controller(policies=FixedPolicy(policy), source=EmptyQueues(), backend=backend, store=store,
                          metrics=metrics), backend

    # The first leader's back-off is long enough to outlast this test on a slow machine.
    first, first_backend = leader(StartBackoff(base=300.0))
    reasons: list[str] = []
    try:
        for _ in range(5):
            reasons += [p.decision.reason for p in first.tick().pools]
            time.sleep(1.5)
    finally:
        first_backend.close()
    second, second_backend = leader(StartBackoff())  # a failover: a new process, the state in Redis
    try:
        later = [second.tick().pools for _ in range(3)]
    finally:
        second_backend.close()

    created = _clones_created(docker_env.client, project.name, since)
    assert created.get("quitter", 0) <= 3 and created.get("pinned", 0) <= 2, f"churn: {created}; {reasons}"
    for pool in ("pinned", "quitter"):
        failed: Any = metrics.replica_failures.labels(pool, "failed-start")._value.get()
        assert failed == 1, (pool, reasons)
    for reports in later:
        assert all("backing off" in p.decision.reason and p.decision.desired == p.decision.current
                   for p in reports), [p.decision.reason for p in reports]
