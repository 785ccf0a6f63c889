"""Warm standbys through the loop: status -> observation -> decision -> actuator -> backend, and the state.

A scripted backend (pure bookkeeping of replicas, standbys and their marks) behind the real loop, Redis state
store and metric source: the Compose backend itself is tested on the real engine (tests/docker/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from autoscaler.backends.base import TargetStatus
from autoscaler.backends.memory import MemoryBackend
from autoscaler.cli import pool_line
from autoscaler.loop import Controller
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.model import BrokerOptions, PoolPolicy
from autoscaler.policy.watch import PolicyWatcher
from autoscaler.settings import Settings
from autoscaler.sources.celery_redis import CeleryRedisSource
from autoscaler.state_store import RedisStateStore
from autoscaler.types import NO_STANDBY, StandbyPlan
from autoscaler.wiring import preview
from tests.test_loop import Clock, publish

pytestmark = pytest.mark.redis

POLICY = """
interval: 1s
pools:
  fast:
    target: {compose: {service: worker-fast}}
    queues: [fast]
    min: 2
    max: 10
    warm: 2
    tiers:
      - {above: 500, replicas: 10}
      - {below: 10, replicas: 2}
    cooldown: {up: 0s, down: 0s}
    stabilization: 0s
"""


@dataclass
class StandbyBackend(MemoryBackend):
    """Replicas, standbys and the active marks of one pool, as plain counts."""

    standby: int = 0
    plans: list[StandbyPlan] = field(default_factory=list)
    marks: tuple[tuple[str, str], ...] = ()
    resumed: list[tuple[tuple[str, str], ...]] = field(default_factory=list)

    def status(self, pool: PoolPolicy) -> TargetStatus:
        return TargetStatus(running=self.replicas[pool.target.service], standby=self.standby,
                            standby_memory=self.standby * (256 << 20))

    def scale(self, pool: PoolPolicy, *, current: int, desired: int, standby: StandbyPlan = NO_STANDBY) -> None:
        self.plans.append(standby)
        self.standby += standby.boot - standby.activate - standby.retire + standby.to_standby
        self.marks = (*self.marks, *((f"{n:064x}", "active") for n in range(standby.activate)))
        self.replicas[pool.target.service] = desired
        self.actions.append((pool.name, current, desired))

    def standby_marks(self, pool: PoolPolicy) -> tuple[tuple[str, str], ...]:
        return self.marks

    def resume_standbys(self, pool: PoolPolicy, marks: tuple[tuple[str, str], ...]) -> None:
        self.resumed.append(marks)


def controller(url: str, path: Path, backend: StandbyBackend, *, dry_run: bool = False,
               metrics: Metrics | None = None) -> Controller:
    return Controller(
        policies=PolicyWatcher(path), source=CeleryRedisSource(url=url, broker=BrokerOptions()), backend=backend,
        store=RedisStateStore(redis.Redis.from_url(url), prefix="autoscaler:"), metrics=metrics or Metrics(),
        dry_run=dry_run, clock=Clock(),
    )


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def test_standbys_are_booted_on_a_hold_then_activated_by_a_burst(redis_url: str, policy_file: Path) -> None:
    backend, metrics = StandbyBackend({"worker-fast": 2}), Metrics()
    report = controller(redis_url, policy_file, backend, metrics=metrics).tick()
    (pool,) = report.pools
    assert (pool.decision.current, pool.decision.desired) == (2, 2)
    assert backend.plans == [StandbyPlan(boot=2)] and pool.action is not None and pool.action.ok
    assert metrics.standby_actions.labels("fast", "boot", "ok")._value.get() == 2

    publish(redis_url, "fast", 600)
    report = controller(redis_url, policy_file, backend, metrics=metrics).tick()
    (pool,) = report.pools
    assert (pool.decision.current, pool.decision.desired) == (2, 10)
    assert backend.plans[-1] == StandbyPlan(activate=2, boot=2)  # activations first, replacements booted
    # The activation is the scale-up's: the target the drift repair keeps is the new count.
    assert pool.decision.state.target == 10
    assert len(pool.decision.state.standbys) == 2

    # A new leader reads which standbys are active from the state, and hands them to its backend.
    successor = StandbyBackend({"worker-fast": 10}, standby=2)
    controller(redis_url, policy_file, successor).tick()
    assert successor.resumed == [backend.marks]


def test_dry_run_changes_no_standby(redis_url: str, policy_file: Path) -> None:
    backend, metrics = StandbyBackend({"worker-fast": 2}), Metrics()
    report = controller(redis_url, policy_file, backend, dry_run=True, metrics=metrics).tick()
    assert report.pools[0].decision.standby == StandbyPlan(boot=2)
    assert backend.plans == [] and backend.standby == 0
    assert metrics.standby_actions.labels("fast", "boot", "dry_run")._value.get() == 2


def test_status_shows_standbys_apart_from_capacity_with_their_memory(redis_url: str, policy_file: Path) -> None:
    """`autoscaler status`: `current` is capacity, `standby` the warm standbys and the memory their limits hold;
    which standbys are active is read from the state, as a new leader would."""
    backend = StandbyBackend({"worker-fast": 2}, standby=2)
    controller(redis_url, policy_file, backend).tick()
    report = preview(Settings(redis_url=redis_url, policy=str(policy_file)), backend=backend)
    (pool,) = report["pools"]
    assert (pool["current"], pool["standby"], pool["standby_memory_bytes"]) == (2, 2, 512 << 20)
    assert pool_line(pool).startswith("fast: current=2 standby=2 (memory limit 512 MiB) desired=2  ")
    assert backend.resumed  # the stored marks, handed to the read-only backend before its status
