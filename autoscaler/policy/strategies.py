"""Strategies: from one metric value and the current count to a recommended count. Pure functions.

Both are monotone in the metric for a fixed current count (more work never recommends fewer replicas),
and both have a band in which they recommend the current count, so a metric that stays in it never
causes a change.
"""

from __future__ import annotations

import math

from autoscaler.policy.model import Metric, PerReplica, PoolPolicy, Tier

__all__ = ["recommend", "recommend_per_replica", "recommend_tiers"]


def recommend(pool: PoolPolicy, metric: float, current: int) -> tuple[int, str]:
    """The pool's strategy applied to `metric`; returns (replicas, explanation). Not yet clamped."""
    if pool.tiers is not None:
        return recommend_tiers(pool.tiers, metric, current, floor=pool.min, ceiling=pool.max)
    assert pool.per_replica is not None  # the model guarantees exactly one strategy
    return recommend_per_replica(pool.per_replica, metric, current, proportional=pool.metric is Metric.LATENCY)


def recommend_tiers(tiers: list[Tier], metric: float, current: int, *, floor: int, ceiling: int) -> tuple[int, str]:
    """Exact-capacity steps, the seed's rule.

    The highest `above` tier the metric exceeds wins; else the tightest `below` tier it is under; else
    the metric is in the hold band between them and the current count holds, kept between the counts of
    the tiers on either side of the band (so a pool at 10 with depth 50 goes to the `> 100` tier's 5:
    holding 10 there would ask for more replicas than a deeper queue of 150 does).
    """
    above = [t for t in tiers if t.above is not None]
    below = [t for t in tiers if t.below is not None]
    for tier in above:  # listed with falling bounds
        if metric > tier.bound:
            return tier.replicas, f"{_num(metric)} > {_num(tier.bound)}: tier of {tier.replicas}"
    for tier in reversed(below):  # tightest bound first
        if metric < tier.bound:
            return tier.replicas, f"{_num(metric)} < {_num(tier.bound)}: tier of {tier.replicas}"
    low = below[0].replicas if below else floor
    high = above[-1].replicas if above else ceiling
    band = f"{_num(below[0].bound) if below else '0'}..{_num(above[-1].bound) if above else 'inf'}"
    held = min(max(current, low), high)
    if held != current:
        return held, f"{_num(metric)} in hold band {band}: limited to {low}..{high}"
    return held, f"{_num(metric)} in hold band {band}: hold"


def recommend_per_replica(
    target: PerReplica, metric: float, current: int, *, proportional: bool = False
) -> tuple[int, str]:
    """KEDA-style `ceil(metric / value)` with the HPA's tolerance band around the current count.

    For latency the count is proportional instead (`ceil(current * latency / value)`, the HPA formula):
    latency per replica means nothing, latency against a target does.
    """
    if current == 0 and metric <= target.activation:
        return 0, f"{_num(metric)} <= activation {_num(target.activation)}: stay at 0"
    if current > 0:
        ratio = metric / (current * target.value) if not proportional else metric / target.value
        if abs(ratio - 1) <= target.tolerance:
            return current, f"{_num(metric)} within {target.tolerance:.0%} of target {_num(target.value)}: hold"
    wanted = math.ceil(max(current, 1) * metric / target.value) if proportional else math.ceil(metric / target.value)
    return wanted, f"{_num(metric)} / target {_num(target.value)} -> {wanted}"


def _num(value: float) -> str:
    return f"{value:g}" if value != int(value) else str(int(value))
