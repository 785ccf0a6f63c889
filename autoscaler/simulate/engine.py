"""The replay: a trace's observations fed through the live loop's own `Controller.tick()` on simulated time.

Nothing here decides anything. The controller gets a metric source that serves the trace (or, in the
closed loop, the simulated backlog) for the simulated clock's time, the in-memory backend and state store,
a policy that never changes, no leader lock, and `dry_run=False` so that actions start cooldowns exactly
as they would live. Cooldowns, stabilization, sustain and step limits therefore behave as in production.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from loguru import logger

from autoscaler.backends.memory import MemoryBackend
from autoscaler.loop import Controller, TickReport
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.model import Policy
from autoscaler.policy.watch import FixedPolicy
from autoscaler.simulate.queueing import ClosedLoop
from autoscaler.simulate.traces import Trace
from autoscaler.simulate.workload import PoolCapacity, RateArrivals, RecordedArrivals
from autoscaler.state_store import MemoryStateStore
from autoscaler.types import Direction, QueueStats

__all__ = [
    "TIMING_SLACK",
    "Replay",
    "ReplaySource",
    "SimClock",
    "TickRecord",
    "replay",
    "tick_times",
]

# A recorder's rows drift a few milliseconds per tick from an exact grid; a row this fraction of an
# interval late still counts as the observation of that tick, so the replay does not lag a row behind.
TIMING_SLACK = 0.1

# Modules that log every tick and action; muted while replaying so the timeline and summary stay readable.
_CHATTY = ("autoscaler.loop", "autoscaler.actions", "autoscaler.observability.logs")

Progress = Callable[[int, int], None]


class SimClock:
    """Simulated time, set by the engine before each tick."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class _World(Protocol):
    def observe(self, t: float) -> Mapping[str, QueueStats]: ...


class ReplaySource:
    """A metric source serving, for the clock's current time, what the world holds for each queue asked."""

    def __init__(self, *, clock: Callable[[], float], world: _World) -> None:
        self._clock = clock
        self._world = world

    def observe(self, queues: Sequence[str]) -> dict[str, QueueStats]:
        available = self._world.observe(self._clock())
        return {q: available[q] for q in queues if q in available}

    def close(self) -> None:
        return None


class _OpenLoop:
    """Depths as recorded: the latest row at or before the time."""

    def __init__(self, trace: Trace, *, slack: float) -> None:
        self._trace = trace
        self._slack = slack

    def observe(self, t: float) -> Mapping[str, QueueStats]:
        row = self._trace.at(t, slack=self._slack)
        return {} if row is None else row.queues


@dataclass(frozen=True, slots=True)
class TickRecord:
    """One pool at one tick. `replicas` is what runs after the tick's action, until the next tick."""

    t: float
    pool: str
    depth: int
    metric: float | None
    current: int | None
    desired: int | None
    replicas: int
    action: Direction
    reason: str
    recommendation: int | None = None


@dataclass(frozen=True, slots=True)
class Replay:
    """The outcome of replaying one policy over one trace."""

    label: str
    policy: Policy
    trace: Trace
    interval: float
    closed_loop: bool
    ticks: tuple[TickRecord, ...]
    capacity: Mapping[str, PoolCapacity] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        """Simulated seconds covered: every tick stands for one interval."""
        return len({r.t for r in self.ticks}) * self.interval

    @property
    def pools(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.policy.pools)

    def pool_ticks(self, pool: str) -> list[TickRecord]:
        return [r for r in self.ticks if r.pool == pool]


def tick_times(trace: Trace, interval: float) -> list[float]:
    """Tick times from 0: up to the last row (scenarios: up to their nominal end, exclusive)."""
    if trace.end is not None:
        count = math.ceil(trace.end / interval - 1e-9)
    else:
        count = math.floor((trace.last + TIMING_SLACK * interval) / interval) + 1
    return [k * interval for k in range(count)]


@contextmanager
def _quiet() -> Iterator[None]:
    for name in _CHATTY:
        logger.disable(name)
    try:
        yield
    finally:
        for name in _CHATTY:
            logger.enable(name)


def _closed_loop(
    policy: Policy, trace: Trace, capacity: Mapping[str, PoolCapacity], initial: Mapping[str, int]
) -> ClosedLoop:
    if trace.arrival_rate is not None:
        rate = RateArrivals(trace.arrival_rate)
        return ClosedLoop(policy=policy, arrivals=rate, capacity=capacity, replicas=initial)
    arrivals = RecordedArrivals(trace, policy=policy, capacity=capacity, initial=initial)
    return ClosedLoop(
        policy=policy, arrivals=arrivals, capacity=capacity, replicas=initial, backlog=trace.rows[0].queues
    )


def replay(
    policy: Policy,
    trace: Trace,
    *,
    label: str = "policy",
    interval: float | None = None,
    initial: Mapping[str, int] | None = None,
    capacity: Mapping[str, PoolCapacity] | None = None,
    progress: Progress | None = None,
) -> Replay:
    """Replay `trace` through `policy`; closed loop when `capacity` is given, else depths as recorded.

    Each pool starts at `initial[pool]`, or its `min`.
    """
    step = interval or policy.interval
    counts = {p.name: (initial or {}).get(p.name, p.min) for p in policy.pools}
    clock = SimClock()
    closed = None if capacity is None else _closed_loop(policy, trace, capacity, counts)
    world: _World = closed if closed is not None else _OpenLoop(trace, slack=TIMING_SLACK * step)
    backend = MemoryBackend(replicas={p.target.service: counts[p.name] for p in policy.pools})
    controller = Controller(
        policies=FixedPolicy(policy),
        source=ReplaySource(clock=clock, world=world),
        backend=backend,
        store=MemoryStateStore(),
        metrics=Metrics(),
        lock=None,
        dry_run=False,
        clock=clock,
    )
    times = tick_times(trace, step)
    records: list[TickRecord] = []
    with _quiet():
        for i, t in enumerate(times):
            clock.now = t
            report = controller.tick()
            records.extend(_records(report, policy, backend))
            if closed is not None:
                for pool_report in report.pools:
                    if pool_report.action is not None and pool_report.action.ok:
                        assert pool_report.decision.desired is not None  # an action always has a target
                        closed.scaled(pool_report.decision.pool, at=t, desired=pool_report.decision.desired)
                if i + 1 < len(times):
                    closed.advance(t, times[i + 1])
            if progress is not None:
                progress(i + 1, len(times))
    return Replay(
        label=label,
        policy=policy,
        trace=trace,
        interval=step,
        closed_loop=closed is not None,
        ticks=tuple(records),
        capacity=dict(capacity or {}),
    )


def _records(report: TickReport, policy: Policy, backend: MemoryBackend) -> list[TickRecord]:
    records = []
    for pool_report in report.pools:
        decision = pool_report.decision
        pool = policy.pool(decision.pool)
        records.append(
            TickRecord(
                t=report.at,
                pool=decision.pool,
                depth=sum(q.waiting for q in pool_report.queues),
                metric=decision.metric,
                current=decision.current,
                desired=decision.desired,
                replicas=backend.replicas[pool.target.service],
                action=decision.direction,
                reason=decision.reason,
                recommendation=decision.recommendation,
            )
        )
    return records
