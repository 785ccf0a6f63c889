"""A pool whose replicas crash at start never grows past `max`, and backs off (Trust boundaries I, defect 2).

With `restart: unless-stopped` a crashing replica is "restarting", never "running": the pool reads 0 running,
below its min of 2, and the min correction skips cooldowns. Before, every tick created two more containers
(14 for a max of 10 after five ticks). Now restarting replicas count as capacity on its way, every container
that exists counts against `max`, and a scale-up whose replicas fail backs off, saying so.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest
from dockertest import unique_name

from autoscaler.backends.compose import ComposeBackend
from autoscaler.backends.docker_client import DockerConnection
from autoscaler.backends.start_backoff import StartBackoff
from autoscaler.loop import Controller
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.model import Policy
from autoscaler.policy.watch import FixedPolicy
from autoscaler.state_store import MemoryStateStore
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
