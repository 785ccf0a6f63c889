"""StartBackoff: a scale-up whose replicas fail backs the pool off, doubling, reset by one that works; the back-off
is kept in the pool's state, so a new leader honours it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest
import redis

from autoscaler.backends.base import BackendError
from autoscaler.backends.memory import MemoryBackend
from autoscaler.backends.start_backoff import StartBackoff
from autoscaler.loop import Controller
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.model import Policy, PoolPolicy
from autoscaler.policy.watch import FixedPolicy
from autoscaler.state_store import RedisStateStore
from autoscaler.types import PoolState, QueueStats, StartBackoffState

NOW = 1_000_000.0


def test_a_failed_round_blocks_then_doubles_then_a_good_round_resets() -> None:
    b = StartBackoff(base=30, ceiling=100, window=120)
    b.started("fast", ["a", "b"], now=0)
    assert b.observe("fast", {"a": "running", "b": "restarting"}, now=5) is not None
    assert "next try in 25s" in (b.blocked("fast", now=10) or "")
    assert b.blocked("fast", now=35) is None
    b.started("fast", ["c"], now=40)
    b.observe("fast", {"c": "failed"}, now=41)
    assert "next try in 1m" in (b.blocked("fast", now=41) or "")  # 60 s: doubled
    b.started("fast", ["d"], now=200)
    b.observe("fast", {"d": "failed"}, now=201)
    assert "next try in 1m40s" in (b.blocked("fast", now=201) or "")  # 120 capped at 100
    b.started("fast", ["e"], now=400)
    assert b.observe("fast", {"e": "running"}, now=530) is None  # ran through the window
    b.started("fast", ["f"], now=600)
    b.observe("fast", {"f": "failed"}, now=601)
    assert "next try in 30s" in (b.blocked("fast", now=601) or ""), "a good round did not reset the back-off"


def test_failures_after_the_window_or_of_other_containers_do_not_count() -> None:
    b = StartBackoff(base=30, window=60)
    b.started("fast", ["a"], now=0)
    assert b.observe("fast", {"a": "running", "old": "restarting"}, now=10) is None
    assert b.observe("fast", {"a": "failed"}, now=100) is None  # failed at work, not at start
    assert b.blocked("fast", now=100) is None
    assert b.observe("io", {"x": "failed"}, now=1) is None  # no round of io's


# -- issue 17, item 7: exits at once, failed starts, and a failover ---------------------------------------------


def test_a_replica_that_exits_0_at_once_fails_its_round() -> None:
    """`restart: no` or `on-failure` and exit 0: the replica never ran, and was recreated every tick."""
    b = StartBackoff(base=30, window=120)
    b.started("fast", ["a", "b"], now=0)
    assert "exited within 2s" in (b.observe("fast", {"a": "exited", "b": "running"}, now=2) or "")
    assert "next try in 30s" in (b.blocked("fast", now=2) or "")


def test_our_own_victims_exiting_do_not_fail_the_round() -> None:
    """A replica of the round that this controller drained (a scale-down, an unhealthy replacement) exits 0."""
    b = StartBackoff(base=30, window=120)
    b.started("fast", ["a", "b"], now=0)
    b.spare("fast", ["a"])
    assert b.observe("fast", {"a": "exited", "b": "running"}, now=5) is None
    assert b.blocked("fast", now=5) is None
    assert b.observe("fast", {"b": "running"}, now=121) is None  # the rest ran through the window


def test_a_failed_start_backs_off_at_once_and_is_reported_once() -> None:
    """The start call itself fails ("port is already allocated"): no container to judge, the round failed."""
    b = StartBackoff(base=30, window=120)
    b.started("fast", [], now=0, failed=2, error="500 Server Error: port is already allocated\n\x1b[31m")
    assert "next try in 30s" in (b.blocked("fast", now=0) or "")
    reported = b.observe("fast", {}, now=1)
    assert reported is not None and "2 of 2 new replicas failed to start" in reported and "\x1b" not in reported
    assert b.observe("fast", {}, now=2) is None
    b.started("fast", ["c"], now=31, failed=1, error="port is already allocated")
    assert "next try in 1m" in (b.blocked("fast", now=31) or "")  # a second failed round in a row: doubled


def test_a_new_leader_restored_from_the_saved_state_keeps_backing_off_and_judging() -> None:
    old = StartBackoff(base=30, window=120)
    old.started("fast", ["a" * 64], now=0)
    old.observe("fast", {"a" * 64: "exited"}, now=3)
    old.started("io", ["b" * 64], now=10)
    saved = {pool: PoolState.from_json(replace(PoolState(), backoff=old.snapshot(pool)).to_json()).backoff
             for pool in ("fast", "io")}

    new = StartBackoff(base=30, window=120)
    for pool, backoff in saved.items():
        new.restore(pool, backoff, now=20)
    assert "next try in 13s" in (new.blocked("fast", now=20) or ""), "a failover reset the back-off"
    # The round the old leader created is judged by the new one.
    assert new.observe("io", {"b" * 64: "restarting"}, now=21) is not None
    assert new.blocked("io", now=21) is not None


def test_a_restored_back_off_from_the_future_is_clamped_and_huge_counts_do_not_overflow() -> None:
    b = StartBackoff(base=30, ceiling=600, window=120)
    b.restore("fast", StartBackoffState(failed_rounds=10_000, until=1e15, why="forged",
                                        round_ids=("a" * 64,), round_created=1e15), now=100)
    assert "next try in 10m" in (b.blocked("fast", now=100) or "")
    # Its round was created "now" at the latest: an exit seen past the window is not a failed start.
    assert b.observe("fast", {"a" * 64: "exited"}, now=221) is None
    b.started("fast", ["c" * 64], now=800)
    assert b.observe("fast", {"c" * 64: "failed"}, now=801) is not None
    assert "next try in 10m" in (b.blocked("fast", now=801) or "")  # 2**10000 times the base, capped


class FailingStarts(MemoryBackend):
    """A backend whose new replicas never start (a scripted engine: what is judged is the bookkeeping)."""

    def __init__(self, running: int) -> None:
        super().__init__({"worker-fast": running})
        self.backoff = StartBackoff()
        self.creates = 0

    def scale(self, pool: PoolPolicy, *, current: int, desired: int) -> None:
        blocked = self.backoff.blocked(pool.name, NOW)
        if blocked:
            raise BackendError(blocked)
        self.creates += desired - current
        self.backoff.started(pool.name, [], NOW, failed=desired - current, error="port is already allocated")
        raise BackendError("started 0 new replicas")

    def start_backoff(self, pool: PoolPolicy) -> StartBackoffState:
        return self.backoff.snapshot(pool.name)

    def resume_start_backoff(self, pool: PoolPolicy, saved: StartBackoffState) -> None:
        self.backoff.restore(pool.name, saved, NOW)


class NoQueues:
    def observe(self, queues: Sequence[str]) -> dict[str, QueueStats]:
        return {q: QueueStats(name=q, waiting=0) for q in queues}

    def close(self) -> None:
        return None


@pytest.mark.redis
def test_the_loop_keeps_the_back_off_in_the_state_and_a_new_leader_waits(redis_url: str) -> None:
    policy = Policy.model_validate({"interval": "1s", "pools": {"fast": {
        "target": {"compose": {"service": "worker-fast"}}, "queues": ["fast"], "min": 3, "max": 5,
        "tiers": [{"below": 10, "replicas": 3}],
    }}})

    def leader(backend: FailingStarts) -> Controller:
        return Controller(policies=FixedPolicy(policy), source=NoQueues(), backend=backend,
                          store=RedisStateStore(redis.Redis.from_url(redis_url)), metrics=Metrics(),
                          clock=lambda: NOW)

    first = FailingStarts(running=1)
    controller = leader(first)
    reasons = [controller.tick().pools[0].decision.reason for _ in range(3)]
    assert first.creates == 2, reasons
    assert "backing off, next try in 30s" in reasons[-1] and "not done" not in reasons[-1], reasons

    second = FailingStarts(running=1)  # a failover: a new process, the state in Redis
    held = leader(second).tick().pools[0].decision
    assert second.creates == 0 and held.desired == held.current and "backing off" in held.reason
