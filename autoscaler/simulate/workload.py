"""What the closed loop needs beyond the trace: each pool's capacity, and the tasks that arrived.

Throughput estimator (tasks/s per replica, from a recording): a pool's outstanding work is the sum over
its queues of `waiting + unacked` (prefetch moves tasks from waiting to unacked without serving them, so
the sum is what only finished work lowers). Over a period between two rows in which the pool's recorded
replica count did not change and its outstanding work fell without reaching zero, the workers were busy
throughout and served at least the fall: `fall / (replicas * seconds)` is a lower bound on the per-replica
rate, short of it exactly by the tasks that arrived meanwhile. The estimate is the 90th percentile of those
bounds (at least three periods), which approaches the quiet periods' near-exact values without resting on
one outlier.

Arrivals from a trace, per period between rows and per queue: `depth(next) - depth(this) + served`, where
`served` is what the recorded replicas (the smaller count at either end of the period, as new replicas
boot and removed ones stop at once) could do at the pool's throughput; when the queue ends the period
empty only what was there at its start is counted as served (the tasks that came and went unseen are not
knowable), so a replay with the recorded replicas reproduces the recorded depths. A CSV records no replicas:
each pool is taken to have run its initial count throughout. Scenarios carry their arrival rate.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from autoscaler.policy.model import Policy, PoolPolicy
from autoscaler.simulate.traces import ArrivalRate, Trace, TraceRow

__all__ = [
    "DEFAULT_THROUGHPUT",
    "Arrivals",
    "PoolCapacity",
    "RateArrivals",
    "RecordedArrivals",
    "ThroughputEstimate",
    "estimate_throughput",
    "resolve_capacity",
]

DEFAULT_THROUGHPUT = 1.0
_QUANTILE = 0.9
_MIN_PERIODS = 3


@dataclass(frozen=True, slots=True)
class PoolCapacity:
    """How fast a pool's ready replicas work and how long a new one takes to start; `origin` says whence."""

    throughput: float
    boot_delay: float = 0.0
    origin: str = "default"


@dataclass(frozen=True, slots=True)
class ThroughputEstimate:
    rate: float
    periods: int


def _outstanding(row: TraceRow, queues: list[str]) -> float | None:
    if any(q not in row.queues for q in queues):
        return None
    return float(sum(row.queues[q].waiting + row.queues[q].unacked for q in queues))


def estimate_throughput(trace: Trace, pool: PoolPolicy) -> ThroughputEstimate | None:
    """Per-replica tasks/s of `pool` from a recording (see the module doc); None without enough evidence."""
    bounds: list[float] = []
    for this, after in zip(trace.rows, trace.rows[1:], strict=False):
        seconds = after.t - this.t
        replicas = this.pools.get(pool.name)
        if seconds <= 0 or not replicas or after.pools.get(pool.name) != replicas:
            continue
        start, end = _outstanding(this, pool.queues), _outstanding(after, pool.queues)
        if start is None or end is None or not 0 < end < start:
            continue
        bounds.append((start - end) / (replicas * seconds))
    if len(bounds) < _MIN_PERIODS:
        return None
    bounds.sort()
    rank = max(0, math.ceil(_QUANTILE * len(bounds)) - 1)
    return ThroughputEstimate(rate=bounds[rank], periods=len(bounds))


class Arrivals(Protocol):
    def arrivals(self, queue: str, t0: float, t1: float) -> float:
        """Tasks that arrive on `queue` between `t0` and `t1` (seconds from the start)."""
        ...


class RateArrivals:
    """Arrivals from a rate function (scenarios), by the midpoint rule: the engine's steps are short."""

    def __init__(self, rate: ArrivalRate) -> None:
        self._rate = rate

    def arrivals(self, queue: str, t0: float, t1: float) -> float:
        return self._rate(queue, (t0 + t1) / 2) * (t1 - t0)


class RecordedArrivals:
    """Arrivals derived from a trace's depths and recorded replicas, spread evenly over each period."""

    def __init__(
        self,
        trace: Trace,
        *,
        policy: Policy,
        capacity: Mapping[str, PoolCapacity],
        initial: Mapping[str, int],
    ) -> None:
        self._times = [row.t for row in trace.rows]
        self._cumulative: dict[str, list[float]] = {q: [0.0] for q in trace.queues}
        known = dict(initial)
        for this, after in zip(trace.rows, trace.rows[1:], strict=False):
            known.update(this.pools)
            served = self._capacity(
                policy, capacity, replicas=known, later=after.pools, row=this, seconds=after.t - this.t
            )
            for queue, totals in self._cumulative.items():
                totals.append(totals[-1] + self._period(queue, this, after, served.get(queue, 0.0)))

    @staticmethod
    def _capacity(
        policy: Policy,
        capacity: Mapping[str, PoolCapacity],
        *,
        replicas: Mapping[str, int],
        later: Mapping[str, int],
        row: TraceRow,
        seconds: float,
    ) -> dict[str, float]:
        served: dict[str, float] = {}
        for pool in policy.pools:
            # New replicas boot and removed ones stop at once: the smaller count served the whole period.
            running = min(replicas.get(pool.name, 0), later.get(pool.name, replicas.get(pool.name, 0)))
            work = running * capacity[pool.name].throughput * seconds
            stats = [row.queues[q] for q in pool.queues if q in row.queues]
            depths = {s.name: float(s.waiting + s.unacked) for s in stats}
            total = sum(depths.values())
            for q, depth in depths.items():
                share = depth / total if total else 1 / len(depths)
                served[q] = served.get(q, 0.0) + work * share
        return served

    @staticmethod
    def _period(queue: str, this: TraceRow, after: TraceRow, capacity: float) -> float:
        if queue not in this.queues or queue not in after.queues:
            return 0.0
        start = this.queues[queue].waiting + this.queues[queue].unacked
        end = after.queues[queue].waiting + after.queues[queue].unacked
        served = capacity if end > 0 else min(capacity, float(start))
        return max(0.0, end - start + served)

    def _total(self, queue: str, t: float) -> float:
        totals = self._cumulative.get(queue)
        if totals is None or t <= self._times[0]:
            return 0.0
        i = bisect.bisect_right(self._times, t) - 1
        if i >= len(self._times) - 1:
            return totals[-1]
        span = self._times[i + 1] - self._times[i]
        fraction = (t - self._times[i]) / span if span > 0 else 1.0
        return totals[i] + (totals[i + 1] - totals[i]) * fraction

    def arrivals(self, queue: str, t0: float, t1: float) -> float:
        return self._total(queue, t1) - self._total(queue, t0)


def resolve_capacity(
    policy: Policy,
    trace: Trace,
    *,
    throughput: Mapping[str, float],
    boot_delay: Mapping[str, float],
) -> dict[str, PoolCapacity]:
    """Each pool's capacity: the flag's value, else estimated from a recording, else `DEFAULT_THROUGHPUT`."""
    resolved: dict[str, PoolCapacity] = {}
    for pool in policy.pools:
        boot = boot_delay.get(pool.name, 0.0)
        if pool.name in throughput:
            resolved[pool.name] = PoolCapacity(throughput[pool.name], boot, "--throughput")
            continue
        estimate = estimate_throughput(trace, pool) if trace.kind == "recording" else None
        if estimate is not None:
            origin = f"estimated from {estimate.periods} periods of the recording"
            resolved[pool.name] = PoolCapacity(estimate.rate, boot, origin)
        else:
            why = "no recording to estimate from" if trace.kind != "recording" else "too few falling periods"
            resolved[pool.name] = PoolCapacity(DEFAULT_THROUGHPUT, boot, f"default: {why}; set --throughput")
    return resolved
