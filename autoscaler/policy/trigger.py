"""When a cheap reading between ticks is worth a full read: the waiting count at which a pool's strategy would
ask for more replicas than it runs. Pure; the watcher (sources/queue_watch.py) compares, the loop decides.

The watcher can only count messages (LLEN of a pool's lists, priority sub-lists included), so the threshold
is said in waiting messages:

* `waiting`: the smallest count the strategy turns into more than `current` (it is monotone in the metric
  for a fixed count, so a bisection finds it);
* `waiting_unacked`: the same, less the unacked entries of the last full read (the cheap reading cannot see
  them; unacked only grows as waiting falls, so a burst still shows as waiting);
* `latency`: a count cannot say an age, so any rise above the last full read's count is worth a full read.

Every answer only ever causes a full read: the decision is the ordinary one, with its sustain, cooldowns
and step limits.
"""

from __future__ import annotations

import math

from autoscaler.policy.model import Metric, PoolPolicy
from autoscaler.policy.strategies import recommend

__all__ = ["MAX_THRESHOLD", "scale_up_metric", "wake_threshold"]

# Past this no reading matters: a pool whose strategy asks for no more even here never wakes early.
MAX_THRESHOLD = 1e12
_BISECTIONS = 80


# (id of the pool, current) -> (the pool, its answer): the loop asks after every read of every pool, and the
# answer only changes with the count or the policy. The pool is kept so an id reused by a new policy misses.
_CACHE: dict[tuple[int, int], tuple[PoolPolicy, float | None]] = {}
_CACHE_SIZE = 4096


def scale_up_metric(pool: PoolPolicy, current: int) -> float | None:
    """The smallest metric value whose recommendation (clamped to min..max) is above `current`; None when none
    is (the pool is at max, or paused)."""
    cached = _CACHE.get((id(pool), current))
    if cached is not None and cached[0] is pool:
        return cached[1]
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.clear()
    answer = _scale_up_metric(pool, current)
    _CACHE[(id(pool), current)] = (pool, answer)
    return answer


def _scale_up_metric(pool: PoolPolicy, current: int) -> float | None:
    if not pool.enabled or current >= pool.max:
        return None

    def more(metric: float) -> bool:
        return min(max(recommend(pool, metric, current)[0], pool.min), pool.max) > current

    if more(0.0):
        return 0.0
    if not more(MAX_THRESHOLD):
        return None
    low, high = 0.0, MAX_THRESHOLD  # more(low) is False, more(high) is True
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if more(middle):
            high = middle
        else:
            low = middle
    return high


def wake_threshold(pool: PoolPolicy, current: int | None, *, waiting: int, unacked: int) -> int | None:
    """The waiting count (summed over the pool's queues) at or above which an early full read is due, given
    the last full read's `waiting` and `unacked`; None: no count is (unknown current, at max, paused)."""
    if current is None:
        return None
    if pool.metric is Metric.LATENCY:
        return waiting + 1 if pool.enabled and current < pool.max else None
    metric = scale_up_metric(pool, current)
    if metric is None:
        return None
    if pool.metric is Metric.WAITING_UNACKED:
        metric -= unacked
    return max(0, math.ceil(metric))
