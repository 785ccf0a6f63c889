"""Push-triggered evaluation and actions that never block the loop (issue 19, items 1 and 2).

A real Redis with real Celery-published messages, the in-memory backend (a scripted slow one where an action
must take long). No timing assertions: the tests count evaluations and order events; the waits are only
generous bounds for a loaded machine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from celery import Celery
from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.backends.memory import MemoryBackend
from autoscaler.inflight import ActionsInFlight
from autoscaler.leader import LeaderLock
from autoscaler.loop import Controller, TickReport, run_forever
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.load import parse_policy
from autoscaler.policy.model import BrokerOptions, PoolPolicy
from autoscaler.policy.strategies import recommend
from autoscaler.policy.trigger import scale_up_metric, wake_threshold
from autoscaler.policy.watch import PolicyWatcher
from autoscaler.sources.celery_redis import CeleryRedisSource
from autoscaler.sources.queue_watch import MAX_PER_INTERVAL, QueueWatcher, WatchPlan, WatchTarget
from autoscaler.state_store import RedisStateStore
from autoscaler.types import PoolState

pytestmark = pytest.mark.redis

# An hour between ticks: anything decided after the first tick was decided by a push.
FAST = """
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
    stabilization: 5m%s
"""
IO = """
  io:
    target: {compose: {service: worker-io}}
    queues: [io_intensive]
    min: 2
    max: 6
    tiers:
      - {above: 100, replicas: 6}
      - {below: 10, replicas: 2}
    stabilization: 0s
    cooldown: {up: 0s, down: 0s}
"""
POLICY = "interval: 1h\npools:" + FAST + IO


def publish(url: str, queue: str, count: int) -> None:
    app = Celery("producer", broker=url)
    with app.producer_or_acquire() as producer:
        for _ in range(count):
            app.send_task("tasks.noop", queue=queue, producer=producer)
    app.close()


def publish_at_once(url: str, queue: str, count: int) -> None:
    """`count` real task messages appear in `queue` in one step (published aside, then renamed): the crossing
    is one event, so the number of decisions it causes is exact."""
    publish(url, f"{queue}-staging", count)
    redis.Redis.from_url(url).rename(f"{queue}-staging", queue)


def make_controller(url: str, policy: Path, backend: MemoryBackend, **kwargs: object) -> Controller:
    client = redis.Redis.from_url(url)
    return Controller(
        policies=PolicyWatcher(policy),
        source=CeleryRedisSource(url=url, broker=BrokerOptions()),
        backend=backend,
        store=RedisStateStore(client, prefix="autoscaler:"),
        metrics=Metrics(),
        lock=LeaderLock(client, key="autoscaler:leader", instance_id="a", ttl=3600),
        **kwargs,  # type: ignore[arg-type]
    )


def wait_for(condition: Callable[[], bool], what: str, bound: float = 60.0) -> None:
    deadline = time.monotonic() + bound
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


class Running:
    """run_forever in a thread with the queue watch on; every report kept."""

    def __init__(self, controller: Controller, url: str) -> None:
        self.reports: list[TickReport] = []
        self.stop, self.reload, self.wake = threading.Event(), threading.Event(), threading.Event()
        self.client = redis.Redis.from_url(url)
        self.thread = threading.Thread(target=run_forever, args=(controller,), kwargs={
            "interval": lambda: 3600.0, "stop": self.stop, "reload": self.reload, "wake": self.wake,
            "on_tick": self.reports.append, "watch_client": self.client,
        })

    def __enter__(self) -> Running:
        self.thread.start()
        wait_for(lambda: bool(self.reports), "the first tick")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.wake.set()
        self.thread.join(timeout=30)
        self.client.close()

    def of(self, trigger: str) -> list[TickReport]:
        return [r for r in self.reports if r.trigger == trigger]


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY % "")
    return path


def test_a_crossing_between_ticks_is_decided_at_once_and_once(redis_url: str, policy_file: Path) -> None:
    """600 waiting appear between two ticks an hour apart: the fast pool goes 2 -> 10 in one early decision,
    before the next tick; nothing else is evaluated early (at max, nothing more can be asked)."""
    backend = MemoryBackend({"worker-fast": 2, "worker-io": 2})
    with Running(make_controller(redis_url, policy_file, backend), redis_url) as run:
        publish_at_once(redis_url, "fast", 600)
        wait_for(lambda: backend.replicas["worker-fast"] == 10, "the early scale-up")
        publish(redis_url, "fast", 50)  # more of the same burst: the pool is at max, no early read
        wait_for(lambda: len(run.of("push")) >= 1, "the early report")
    assert len(run.of("interval")) == 1  # the next tick was an hour away
    assert backend.actions == [("fast", 2, 10)]
    [push] = run.of("push")
    assert [(p.decision.pool, p.decision.current, p.decision.desired) for p in push.pools] == [("fast", 2, 10)]


def test_a_flood_of_fake_hints_causes_no_decision_storm(redis_url: str, tmp_path: Path) -> None:
    """Anyone can LPUSH to a queue. A pool held back by `sustain` while junk floods its queue and tasks keep
    coming is read early at most MAX_PER_INTERVAL times per interval, and the hint decides nothing."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY % "\n    sustain: 10m")
    backend = MemoryBackend({"worker-fast": 2, "worker-io": 2})
    client = redis.Redis.from_url(redis_url)
    with Running(make_controller(redis_url, policy, backend), redis_url) as run:
        flood_until = time.monotonic() + 4.0  # long enough for 16 probes: the cap, not the gap, must bind
        n = 0
        while time.monotonic() < flood_until:
            client.lpush("fast", f"not a task {n}")
            n += 1
            if n % 200 == 0:
                publish(redis_url, "fast", 5)
        wait_for(lambda: len(run.of("push")) >= 1, "an early read")
    early = [p for r in run.of("push") for p in r.pools]
    assert 1 <= len(early) <= MAX_PER_INTERVAL
    assert all(p.decision.pool == "fast" and "not yet sustained" in p.decision.reason for p in early)
    assert backend.actions == []


# -- the watcher's own bookkeeping, on a real Redis with a hand-driven clock --------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_watcher_wakes_on_a_rise_past_the_threshold_within_its_rate_bound(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    clock, woken = Clock(), []
    plan = WatchPlan(interval=15.0, pools={"fast": WatchTarget(("fast",), threshold=101, level=0)})
    watcher = QueueWatcher(client, plan=lambda: plan, on_wake=woken.append, clock=clock)
    client.rpush("fast", *["m"] * 100)
    assert watcher.probe() == []  # below the threshold
    client.rpush("fast", "m")
    assert watcher.probe() == ["fast"]
    assert watcher.probe() == []  # no rise since that wake: the loop has it
    client.rpush("fast", "m")
    assert watcher.probe() == []  # a rise within the 250 ms gap
    clock.now += 0.25
    assert watcher.probe() == ["fast"]
    for _ in range(MAX_PER_INTERVAL + 3):
        clock.now += 0.25
        client.rpush("fast", "m")
        watcher.probe()
    assert len(woken) == MAX_PER_INTERVAL  # at most 8 within the interval
    clock.now += 15.0
    client.rpush("fast", "m")
    assert watcher.probe() == ["fast"]


def test_the_watcher_counts_priority_lists_and_ignores_keys_of_another_type(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.rpush("fast", *["m"] * 60)
    client.rpush("fast\x06\x163", *["m"] * 60)  # kombu's priority sub-list for step 3
    client.hset("io", "x", "y")  # a hash where a queue's list should be: counts 0, never raises
    plan = WatchPlan(interval=15.0, pools={
        "fast": WatchTarget(("fast",), threshold=101, level=0), "io": WatchTarget(("io",), threshold=0, level=-1),
    })
    watcher = QueueWatcher(client, plan=lambda: plan, on_wake=lambda _: None)
    assert watcher.probe() == ["fast", "io"]  # io: 0 >= 0 and above -1


# -- thresholds: the policy's pure answer -----------------------------------------------------------------

POOL = """
pools:
  p:
    target: {compose: {service: s}}
    queues: [q]
    metric: %s
    min: 1
    max: 20
    %s
"""


def pool(metric: str, strategy: str) -> PoolPolicy:
    return parse_policy(POOL % (metric, strategy), source="t.yaml").pools[0]


def test_thresholds_per_metric() -> None:
    tiers = pool("waiting", "tiers: [{above: 500, replicas: 10}, {above: 100, replicas: 5}, {below: 10, replicas: 1}]")
    assert wake_threshold(tiers, 1, waiting=0, unacked=0) == 101
    assert wake_threshold(tiers, 5, waiting=0, unacked=0) == 501
    assert wake_threshold(tiers, 10, waiting=0, unacked=0) is None  # no tier asks for more than 10
    assert wake_threshold(tiers, None, waiting=0, unacked=0) is None
    both = pool("waiting_unacked", "per_replica: {value: 40}")
    # 4 x 40 with the default 10% tolerance: more than 4 from 177 on, of which 30 are unacked.
    assert wake_threshold(both, 4, waiting=100, unacked=30) == 177 - 30
    latency = pool("latency", "per_replica: {value: 10}")
    assert wake_threshold(latency, 4, waiting=7, unacked=0) == 8  # any rise: only a full read can tell
    assert wake_threshold(latency, 20, waiting=7, unacked=0) is None  # at max


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 400), st.floats(0, 0.5), st.integers(0, 25))
def test_the_threshold_is_the_smallest_count_that_asks_for_more(value: int, tol: float, current: int) -> None:
    """Whatever the target and count, the threshold asks for more and anything below it does not."""
    p = pool("waiting", f"per_replica: {{value: {value}, tolerance: {tol}}}")
    metric = scale_up_metric(p, current)
    clamp = lambda m: min(max(recommend(p, m, current)[0], p.min), p.max)  # noqa: E731
    if metric is None:
        assert clamp(1e12) <= current
        return
    assert clamp(metric) > current
    assert metric == 0 or clamp(metric * (1 - 1e-9)) <= current


# -- actions that never block the loop ----------------------------------------------------------------------


class SlowBackend(MemoryBackend):
    """Scripted: one service's scale blocks until the test lets it finish (a drain's or a create's seconds)."""

    def __init__(self, replicas: dict[str, int], slow: str) -> None:
        super().__init__(replicas)
        self.slow, self.release = slow, threading.Event()
        self.events: list[str] = []

    def scale(self, pool: PoolPolicy, *, current: int, desired: int) -> None:
        if pool.target.service == self.slow:
            self.events.append(f"{pool.name} begins")
            assert self.release.wait(60)
        super().scale(pool, current=current, desired=desired)
        self.events.append(f"{pool.name} done")


def test_a_slow_drain_of_one_pool_does_not_delay_another_pools_scale_up(redis_url: str, policy_file: Path) -> None:
    """io drains 6 -> 2 (its action blocks); the tick returns, fast's scale-up 2 -> 10 is done meanwhile, the
    next evaluation holds io ("action under way"), and io's own write records its scale-down once it ends."""
    backend = SlowBackend({"worker-fast": 2, "worker-io": 6}, slow="worker-io")
    actions = ActionsInFlight()
    # Pools are reconciled in policy order: the slow one first.
    policy_file.write_text("interval: 1h\npools:" + IO + FAST % "")
    controller = make_controller(redis_url, policy_file, backend, actions=actions)
    publish(redis_url, "fast", 600)
    first = controller.tick()  # io's drain begins and blocks; the tick does not wait for it
    assert [r.decision.pool for r in first.pools] == ["io", "fast"]
    wait_for(lambda: "fast done" in backend.events, "fast's scale-up")
    assert backend.events == ["io begins", "fast done"]
    second = controller.evaluate({"io", "fast"})
    assert {r.decision.pool: r.decision.reason for r in second.pools}["io"] == "action under way: holding"
    backend.release.set()
    assert actions.wait(60)
    assert backend.events == ["io begins", "fast done", "io done"]
    stored = controller.store.load(["io", "fast"])
    assert stored["io"].last_scale_down is not None and stored["io"].target == 2
    assert stored["fast"].last_scale_up_to == 10
    assert backend.replicas == {"worker-fast": 10, "worker-io": 2}
    assert isinstance(stored["io"], PoolState)


def test_a_push_evaluation_keeps_the_other_queues_lengths_on_metrics(tmp_path: Path) -> None:
    """An early evaluation reads only the woken pool's queues: celery_queue_length of the others stays (it
    vanished until the next tick, a gap in every dashboard and alert on that name)."""
    from prometheus_client import generate_latest  # noqa: PLC0415

    from autoscaler.state_store import MemoryStateStore  # noqa: PLC0415
    from autoscaler.types import QueueStats  # noqa: PLC0415

    path = tmp_path / "p.yaml"
    path.write_text(
        "interval: 1h\npools:\n"
        "  fast:\n    target: {compose: {service: worker-fast}}\n    queues: [fast]\n    min: 2\n    max: 10\n"
        "    tiers: [{above: 500, replicas: 10}, {below: 10, replicas: 2}]\n"
        "  io:\n    target: {compose: {service: worker-io}}\n    queues: [io]\n    min: 2\n    max: 6\n"
        "    tiers: [{above: 100, replicas: 6}, {below: 10, replicas: 2}]\n"
    )
    depth = {"fast": 0, "io": 50}

    class Source:
        def observe(self, queues: list[str]) -> dict[str, QueueStats]:
            return {q: QueueStats(q, depth[q]) for q in queues}

        def close(self) -> None:
            pass

    metrics = Metrics()
    controller = Controller(policies=PolicyWatcher(path), source=Source(),  # type: ignore[arg-type]
                            backend=MemoryBackend({"worker-fast": 2, "worker-io": 2}), store=MemoryStateStore(),
                            metrics=metrics)
    metrics.set_leader(True)
    controller.tick()
    depth["fast"] = 600
    report = controller.evaluate({"fast"})
    assert report.pools and report.pools[0].decision.desired == 10
    lengths = [line for line in generate_latest(metrics.registry).decode().splitlines()
               if line.startswith("celery_queue_length")]
    assert any('queue_name="io"' in line and line.endswith(" 50.0") for line in lengths), lengths
    assert any('queue_name="fast"' in line and line.endswith(" 600.0") for line in lengths), lengths


def test_a_push_evaluation_replaces_no_unhealthy_replica_and_boots_no_standby(tmp_path: Path) -> None:
    """What anyone who can push to a queue may cause is an early read and a scale-up, nothing else: no
    unhealthy replacement (a drain: up to 8 an interval), no standby boot or retire on a hold."""
    from autoscaler.state_store import MemoryStateStore  # noqa: PLC0415
    from autoscaler.types import QueueStats  # noqa: PLC0415

    path = tmp_path / "p.yaml"
    path.write_text(
        "interval: 1h\npools:\n"
        "  fast:\n    target: {compose: {service: worker-fast}}\n    queues: [fast]\n    min: 2\n    max: 10\n"
        "    warm: 2\n    tiers: [{above: 500, replicas: 10}, {below: 10, replicas: 2}]\n"
        "    cooldown: {up: 1h}\n"
    )
    depth = {"fast": 0}

    class Source:
        def observe(self, queues: list[str]) -> dict[str, QueueStats]:
            return {q: QueueStats(q, depth[q]) for q in queues}

        def close(self) -> None:
            pass

    class Backend(MemoryBackend):
        replaced = 0

        def replace_unhealthy(self, pool: PoolPolicy) -> int:
            self.replaced += 1
            return 0

    backend = Backend({"worker-fast": 2})
    backend.standbys["worker-fast"] = 2
    controller = Controller(policies=PolicyWatcher(path), source=Source(),  # type: ignore[arg-type]
                            backend=backend, store=MemoryStateStore(), metrics=Metrics())
    controller.tick()
    assert backend.replaced == 1
    backend.standbys["worker-fast"] = 0  # both standbys gone: the tick would boot two
    depth["fast"] = 50  # a hold band: no scale-up
    report = controller.evaluate({"fast"})
    assert backend.replaced == 1
    assert report.pools[0].action is None
    assert backend.standbys["worker-fast"] == 0


def test_stopping_waits_for_all_the_actions_under_way_at_most_once_the_timeout() -> None:
    """The wait is one deadline for all, not one per action: five stuck actions and a 1 s wait take about 1 s
    (each joined with the whole timeout, 5 s: past Compose's 30 s stop grace with a stop wait of 10 s)."""
    actions, release = ActionsInFlight(), threading.Event()
    for n in range(5):
        actions.start(f"pool{n}", release.wait)
    started = time.monotonic()
    assert actions.wait(1.0) is False
    assert time.monotonic() - started < 3.0
    release.set()
    assert actions.wait(5.0) is True
