"""A pool whose target does not exist yet: a warning while the controller starts up, an error after."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
from loguru import logger

from autoscaler.backends.memory import MemoryBackend
from autoscaler.loop import STARTUP_GRACE, Controller
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.model import Policy
from autoscaler.policy.watch import FixedPolicy
from autoscaler.state_store import MemoryStateStore
from autoscaler.types import QueueStats
from tests.test_loop import Clock

POLICY = {
    "interval": "15s",
    "pools": {
        "fast": {
            "target": {"compose": {"service": "worker-fast"}},
            "queues": ["fast"],
            "min": 2,
            "max": 10,
            "tiers": [{"above": 500, "replicas": 10}, {"below": 10, "replicas": 2}],
        }
    },
}


class EmptyQueues:
    def observe(self, queues: Sequence[str]) -> dict[str, QueueStats]:
        return {q: QueueStats(name=q, waiting=0, unacked=0, latency_s=None) for q in queues}

    def close(self) -> None:
        return None


@pytest.fixture
def records() -> Iterator[list[tuple[str, str]]]:
    seen: list[tuple[str, str]] = []
    sink = logger.add(lambda m: seen.append((m.record["level"].name, m.record["message"])), level="DEBUG")
    yield seen
    logger.remove(sink)


def _controller(backend: MemoryBackend, clock: Clock) -> Controller:
    return Controller(
        policies=FixedPolicy(Policy.model_validate(POLICY)),
        source=EmptyQueues(),
        backend=backend,
        store=MemoryStateStore(),
        metrics=Metrics(),
        clock=clock,
    )


def test_a_target_that_appears_during_startup_is_a_warning_not_an_error(records):
    """`compose up` may start the autoscaler before the workers: its first ticks wait, they do not cry ERROR."""
    backend, clock = MemoryBackend(), Clock()
    controller = _controller(backend, clock)

    report = controller.tick()
    assert report.pools[0].decision.desired == report.pools[0].decision.current is None
    clock.now += STARTUP_GRACE / 2
    controller.tick()
    backend.replicas["worker-fast"] = 2  # the workers now exist
    clock.now += 15
    report = controller.tick()

    assert report.pools[0].decision.current == 2
    levels = [level for level, _ in records]
    assert "ERROR" not in levels, records
    assert any(level == "WARNING" and "waiting for its target" in msg for level, msg in records), records
    assert controller.metrics.backend_errors.labels("fast")._value.get() == 0


def test_a_target_still_missing_after_startup_is_an_error(records):
    """Past the start-up grace a missing target is a real misconfiguration: ERROR, counted, the pool holds."""
    backend, clock = MemoryBackend(), Clock()
    controller = _controller(backend, clock)
    controller.tick()
    clock.now += STARTUP_GRACE + 1
    report = controller.tick()

    assert report.pools[0].decision.current is None
    assert any(level == "ERROR" and "does not exist" in msg for level, msg in records), records
    assert controller.metrics.backend_errors.labels("fast")._value.get() == 1
