"""The reconcile loop against a real Redis with real Celery-published messages (in-memory backend)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from autoscaler.backends.memory import MemoryBackend
from autoscaler.leader import LeaderLock
from autoscaler.loop import Controller, run_forever
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.model import BrokerOptions
from autoscaler.policy.watch import PolicyWatcher
from autoscaler.sources.celery_redis import CeleryRedisSource
from autoscaler.state_store import RedisStateStore
from autoscaler.types import Direction
from tests.conftest import RedisServer

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.redis

POLICY = """
interval: 1s
pools:
  fast:
    target: {compose: {service: worker-fast}}
    queues: [fast]
    min: 2
    max: 10
    tiers:
      - {above: 500, replicas: 10}
      - {above: 100, replicas: 5}
      - {below: 10, replicas: 2}
    cooldown: {up: 30s, down: 5m}
    stabilization: 5m
  io:
    target: {compose: {service: worker-io}}
    queues: [io_intensive]
    min: 2
    max: 6
    tiers:
      - {above: 100, replicas: 6}
      - {below: 10, replicas: 2}
"""


class Clock:
    """Simulated time for cooldown tests: advanced by hand, never slept."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def publish(url: str, queue: str, count: int) -> None:
    """Publish `count` real Celery task messages to `queue` (nobody consumes them)."""
    app = Celery("producer", broker=url)
    with app.producer_or_acquire() as producer:
        for _ in range(count):
            app.send_task("tasks.noop", queue=queue, producer=producer)
    app.close()


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def make_controller(
    url: str,
    policy_file: Path,
    backend: MemoryBackend,
    *,
    clock: Clock | None = None,
    dry_run: bool | None = None,
    instance: str = "a",
    ttl: float = 30.0,
) -> Controller:
    client = redis.Redis.from_url(url)
    return Controller(
        policies=PolicyWatcher(policy_file),
        source=CeleryRedisSource(url=url, broker=BrokerOptions()),
        backend=backend,
        store=RedisStateStore(client, prefix="autoscaler:"),
        metrics=Metrics(),
        lock=LeaderLock(client, key="autoscaler:leader", instance_id=instance, ttl=ttl),
        dry_run=dry_run,
        clock=clock or Clock(),
    )


def test_burst_scales_fast_pool_to_ten(redis_url: str, policy_file: Path) -> None:
    """600 waiting fast tasks take the fast pool from 2 to 10; the idle io pool holds."""
    publish(redis_url, "fast", 600)
    backend = MemoryBackend({"worker-fast": 2, "worker-io": 2})
    report = make_controller(redis_url, policy_file, backend).tick()
    fast, io = report.pools
    assert (fast.decision.current, fast.decision.desired, fast.queues[0].waiting) == (2, 10, 600)
    assert fast.action is not None and fast.action.ok
    assert io.decision.direction is Direction.HOLD
    assert backend.replicas == {"worker-fast": 10, "worker-io": 2}


def test_dry_run_logs_and_changes_nothing(redis_url: str, policy_file: Path, logs: list[str]) -> None:
    """--dry-run decides the same, logs "would scale POOL from N to M: REASON" and does not act."""
    publish(redis_url, "fast", 600)
    backend = MemoryBackend({"worker-fast": 2, "worker-io": 2})
    controller = make_controller(redis_url, policy_file, backend, dry_run=True)
    report = controller.tick()
    assert report.pools[0].decision.desired == 10
    assert backend.replicas["worker-fast"] == 2 and backend.actions == []
    assert any("would scale fast from 2 to 10: 600 > 500" in line for line in logs)
    # No cooldown starts for an action that did not happen.
    assert controller.states is not None and controller.states["fast"].last_scale_up is None


def test_redis_down_holds_then_recovers(redis_server: RedisServer, redis_url: str, policy_file: Path) -> None:
    """With Redis unreachable every pool holds and says why; when it returns the loop acts again."""
    backend = MemoryBackend({"worker-fast": 2, "worker-io": 2})
    controller = make_controller(redis_url, policy_file, backend)
    controller.lock = None  # the lock lives in the same Redis; leadership is tested separately
    assert controller.tick().metric_error is None
    redis_server.stop()
    try:
        report = controller.tick()
        assert report.metric_error is not None
        for pool in report.pools:
            assert pool.decision.direction is Direction.HOLD
            assert "metric unavailable" in pool.decision.reason
    finally:
        redis_server.start()
    publish(redis_url, "fast", 600)
    # Redis restarted empty (no persistence in tests); the state write of the failed tick was lost with it.
    report = controller.tick()
    assert (report.metric_error, report.pools[0].decision.desired) == (None, 10)
    assert backend.replicas["worker-fast"] == 10


def test_a_wrong_typed_queue_key_holds_only_its_pool(redis_url: str, policy_file: Path) -> None:
    """Issue 17 item 4: `SET fast\\x06\\x169 x` (a priority sub-list name) holds pool fast, naming the key and
    counting it; pool io, on another queue, scales as usual (every pool used to hold)."""
    backend = MemoryBackend({"worker-fast": 2, "worker-io": 2})
    controller = make_controller(redis_url, policy_file, backend)
    controller.lock = None
    publish(redis_url, "io_intensive", 150)
    redis.Redis.from_url(redis_url).set("fast\x06\x169", "x")
    report = controller.tick()
    fast, io = report.pools
    assert report.metric_error is None
    assert fast.decision.direction is Direction.HOLD
    assert "'fast\\x06\\x169'" in fast.decision.reason and "holds a string, not a list" in fast.decision.reason
    assert (io.decision.desired, backend.replicas["worker-io"]) == (6, 6)
    problems = controller.metrics.registry.get_sample_value(
        "autoscaler_queue_read_problems_total", {"queue": "fast", "problem": "unreadable"}
    )
    assert problems == 1


def test_restart_keeps_cooldowns(redis_url: str, policy_file: Path) -> None:
    """A controller restarted right after a scale-up reads the state from Redis: the cooldown's start and the
    count that scale-up reached. Within the up-cooldown a higher reading acts at once (issue 19: 2 -> 5 at a
    half-published burst, then 650 waiting went to 10 only 30 s later); one asking no more holds."""
    clock = Clock()
    publish(redis_url, "fast", 150)
    backend = MemoryBackend({"worker-fast": 2, "worker-io": 2})
    first = make_controller(redis_url, policy_file, backend, clock=clock)
    scaled_at = clock.now
    assert first.tick().pools[0].decision.desired == 5
    first.stop()  # releases the lock like a clean SIGTERM

    publish(redis_url, "fast", 500)  # now 650 waiting: the >500 tier
    clock.now += 10  # inside the 30 s up-cooldown
    second = make_controller(redis_url, policy_file, backend, clock=clock, instance="b")
    stored = second.store.load(["fast"])["fast"]
    assert (stored.last_scale_up, stored.last_scale_up_to) == (scaled_at, 5)
    decision = second.tick().pools[0].decision
    assert (decision.current, decision.desired) == (5, 10), decision.reason
    assert backend.replicas["worker-fast"] == 10


def test_backend_failure_holds_only_that_pool(redis_url: str, policy_file: Path) -> None:
    """A pool whose target is missing holds with the backend's message; the other pools keep working."""
    publish(redis_url, "fast", 600)
    publish(redis_url, "io_intensive", 200)
    backend = MemoryBackend({"worker-io": 2})  # worker-fast does not exist
    report = make_controller(redis_url, policy_file, backend).tick()
    fast, io = report.pools
    assert fast.decision.current is None and "does not exist" in fast.decision.reason
    assert io.decision.desired == 6 and backend.replicas["worker-io"] == 6


def test_only_the_leader_acts_and_standby_takes_over(redis_url: str, policy_file: Path) -> None:
    """Two controllers share one lock: only one acts; when it dies the other leads within two intervals."""
    # The production ratio (lock expiry 1.5 intervals) at 1 s: at 0.4 s the bound left a loaded machine 0.1 s.
    interval, ttl = 1.0, 1.5
    publish(redis_url, "fast", 600)
    backend_a = MemoryBackend({"worker-fast": 2, "worker-io": 2})
    backend_b = MemoryBackend({"worker-fast": 2, "worker-io": 2})
    a = make_controller(redis_url, policy_file, backend_a, instance="a", ttl=ttl, clock=None)
    b = make_controller(redis_url, policy_file, backend_b, instance="b", ttl=ttl, clock=None)
    a.clock = b.clock = time.time
    stop_a, stop_b = threading.Event(), threading.Event()
    ta = threading.Thread(
        target=run_forever,
        args=(a,),
        kwargs={"interval": lambda: interval, "stop": stop_a, "reload": threading.Event()},
    )
    ta.start()
    time.sleep(interval)  # a wins the lock first
    tb = threading.Thread(
        target=run_forever,
        args=(b,),
        kwargs={"interval": lambda: interval, "stop": stop_b, "reload": threading.Event()},
    )
    tb.start()
    try:
        time.sleep(3 * interval)
        assert (a.role, b.role) == ("leader", "standby")
        assert backend_a.actions and not backend_b.actions

        a.lock = None  # the leader "dies": it stops renewing but does not release (a crash)
        stop_a.set()
        ta.join(timeout=5)
        died = time.monotonic()
        while b.role != "leader" and time.monotonic() - died < 5:
            time.sleep(0.02)
        took = time.monotonic() - died
        assert b.role == "leader"
        assert took <= 2 * interval, f"standby took {took:.2f}s to take over"
    finally:
        stop_a.set()
        stop_b.set()
        ta.join(timeout=5)
        tb.join(timeout=5)


def test_policy_edits_while_running(redis_url: str, policy_file: Path, logs: list[str]) -> None:
    """A good edit is applied at the next tick; a bad edit is logged with its errors and changes nothing."""
    publish(redis_url, "fast", 600)
    backend = MemoryBackend({"worker-fast": 2, "worker-io": 2})
    controller = make_controller(redis_url, policy_file, backend)
    controller.policies.poll()

    policy_file.write_text(POLICY.replace("{above: 500, replicas: 10}", "{above: 500, replicas: 8}"))
    report = controller.tick()
    assert report.policy_event == "reloaded"
    assert report.pools[0].decision.desired == 8

    policy_file.write_text(POLICY.replace("max: 10", "max: lots"))
    report = controller.tick()
    assert report.policy_event == "invalid"
    assert report.pools[0].decision.current == 8  # the last good policy is still in force
    assert any("pools.fast.max" in line and "keeping the last good policy" in line for line in logs)


class ExplodingBackend(MemoryBackend):
    """A backend whose status for one service raises something no backend should (a bug, not a BackendError)."""

    def status(self, pool: Any) -> Any:
        if pool.target.service == "worker-fast":
            raise OverflowError("cannot convert float infinity to integer")
        return super().status(pool)


def test_an_exception_in_one_pool_never_stops_the_others(redis_url: str, policy_file: Path) -> None:
    """The io pool is reconciled and every state is saved although the fast pool's reconcile raises; the fast
    pool holds with the error in its reason and the pool-errors metric counts it (Trust boundaries I, 5)."""
    publish(redis_url, "io_intensive", 150)
    backend = ExplodingBackend({"worker-fast": 2, "worker-io": 2})
    controller = make_controller(redis_url, policy_file, backend)
    report = controller.tick()
    fast, io = report.pools
    assert fast.decision.desired is None and "internal error (OverflowError" in fast.decision.reason
    assert (io.decision.current, io.decision.desired) == (2, 6) and backend.replicas["worker-io"] == 6
    assert controller.metrics.pool_errors.labels("fast")._value.get() == 1
    stored = redis.Redis.from_url(redis_url).get("autoscaler:state:io")
    assert stored is not None and b"last_scale_up" in stored


def test_a_reloaded_broker_block_is_used_at_the_next_tick(redis_url: str, policy_file: Path) -> None:
    """A reload to `broker: {key_prefix: "myapp:"}` reads the prefixed queue at once (it kept reading 0)."""
    client = redis.Redis.from_url(redis_url)
    client.rpush("myapp:fast", *[b"{}"] * 300)
    backend = MemoryBackend({"worker-fast": 2, "worker-io": 2})
    controller = make_controller(redis_url, policy_file, backend)
    assert controller.tick().pools[0].queues[0].waiting == 0
    policy_file.write_text(POLICY.replace("pools:", 'broker: {key_prefix: "myapp:"}\npools:'))
    report = controller.tick()
    assert report.policy_event == "reloaded", report.policy_event
    assert report.pools[0].queues[0].waiting == 300
    assert report.pools[0].decision.desired == 5
