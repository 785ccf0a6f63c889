"""The closed loop's world: queues the simulated pools drain, and replicas that take time to boot.

    backlog(t + dt) = max(0, backlog(t) + arrivals(t..t+dt) - served),
    served          = ready replicas x throughput x dt   (shared over a pool's queues by their backlog)

advanced in steps of at most a second between ticks. A scale-up's new replicas count as ready only after
the pool's boot delay; a scale-down removes replicas at once, still-booting ones first. Queues are served
first in, first out, so the age of the oldest waiting task (the `latency` metric) follows from the
cumulative arrivals and services. Everything outstanding is reported as `waiting` (there is no prefetch
here), which is what the `waiting_unacked` metric would see; `unacked` is 0.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from autoscaler.policy.model import Policy
from autoscaler.simulate.workload import Arrivals, PoolCapacity
from autoscaler.types import QueueStats

__all__ = ["ClosedLoop"]

_MAX_STEP = 1.0
_EPSILON = 1e-9


@dataclass
class _Queue:
    backlog: float = 0.0
    served: float = 0.0
    # Cumulative arrivals at points in time: the oldest waiting task is the one whose arrival index
    # equals the cumulative services.
    times: list[float] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)

    def arrive(self, t0: float, t1: float, tasks: float) -> None:
        if tasks <= 0:
            return
        total = self.arrived[-1] if self.arrived else 0.0
        if not self.times or self.times[-1] < t0:
            self.times.append(t0)
            self.arrived.append(total)
        self.times.append(t1)
        self.arrived.append(total + tasks)
        self.backlog += tasks

    def serve(self, tasks: float) -> None:
        tasks = min(tasks, self.backlog)
        self.backlog -= tasks
        self.served += tasks

    def oldest_age(self, now: float) -> float:
        if self.backlog <= _EPSILON:
            return 0.0
        j = bisect.bisect_right(self.arrived, self.served)
        if j == 0 or j >= len(self.arrived):
            return 0.0
        lo_t, hi_t, lo_n, hi_n = self.times[j - 1], self.times[j], self.arrived[j - 1], self.arrived[j]
        born = lo_t + (self.served - lo_n) / (hi_n - lo_n) * (hi_t - lo_t)
        return max(0.0, now - born)


@dataclass
class _Pool:
    running: int
    booting: list[tuple[float, int]] = field(default_factory=list)  # (ready at, replicas), oldest first

    def scale(self, *, at: float, desired: int, boot_delay: float) -> None:
        if desired > self.running:
            self.booting.append((at + boot_delay, desired - self.running))
        else:
            remove = self.running - desired
            while remove and self.booting:  # the newest, still-booting replicas go first
                ready_at, count = self.booting.pop()
                kept = max(0, count - remove)
                remove -= count - kept
                if kept:
                    self.booting.append((ready_at, kept))
        self.running = desired

    def ready(self, t: float) -> int:
        self.booting = [(at, n) for at, n in self.booting if at > t]
        return self.running - sum(n for _, n in self.booting)


class ClosedLoop:
    """Backlog per queue of `policy`, evolving under `arrivals` and the pools' ready replicas."""

    def __init__(
        self,
        *,
        policy: Policy,
        arrivals: Arrivals,
        capacity: Mapping[str, PoolCapacity],
        replicas: Mapping[str, int],
        backlog: Mapping[str, QueueStats] | None = None,
    ) -> None:
        self._policy = policy
        self._arrivals = arrivals
        self._capacity = capacity
        self._pools = {p.name: _Pool(running=replicas[p.name]) for p in policy.pools}
        self._queues: dict[str, _Queue] = {}
        for name in policy.queues:
            queue = _Queue()
            start = (backlog or {}).get(name)
            if start is not None and start.waiting + start.unacked > 0:
                # What waits at the start arrived over its recorded age (or all at once when unknown).
                age = start.latency_s or 0.0
                queue.arrive(-age, 0.0, float(start.waiting + start.unacked))
            self._queues[name] = queue

    def observe(self, t: float) -> dict[str, QueueStats]:
        """What a metric source would read at `t` (the loop must have been advanced to `t`)."""
        return {
            name: QueueStats(name, math.ceil(q.backlog - _EPSILON), 0, round(q.oldest_age(t), 3))
            for name, q in self._queues.items()
        }

    def backlog(self, queue: str) -> float:
        return self._queues[queue].backlog

    def scaled(self, pool: str, *, at: float, desired: int) -> None:
        """The backend now runs `desired` replicas of `pool` (new ones still have to boot)."""
        self._pools[pool].scale(at=at, desired=desired, boot_delay=self._capacity[pool].boot_delay)

    def ready(self, pool: str, t: float) -> int:
        return self._pools[pool].ready(t)

    def advance(self, t0: float, t1: float) -> None:
        """Let tasks arrive and be served from `t0` to `t1`."""
        steps = max(1, math.ceil((t1 - t0) / _MAX_STEP - _EPSILON))
        dt = (t1 - t0) / steps
        for k in range(steps):
            a, b = t0 + k * dt, t0 + (k + 1) * dt
            for name, queue in self._queues.items():
                queue.arrive(a, b, self._arrivals.arrivals(name, a, b))
            for pool in self._policy.pools:
                work = self.ready(pool.name, a) * self._capacity[pool.name].throughput * dt
                waiting = sum(self._queues[q].backlog for q in pool.queues)
                if work <= 0 or waiting <= 0:
                    continue
                fraction = min(1.0, work / waiting)
                for q in pool.queues:
                    self._queues[q].serve(self._queues[q].backlog * fraction)
