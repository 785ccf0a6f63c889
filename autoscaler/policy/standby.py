"""Warm standbys in a decision: how many to activate, return, boot or retire, as counts. Pure.

A standby is a booted worker that consumes none of the pool's queues (see backends/compose_standby.py): it is
not capacity, but it is a container, so it counts toward the pool's `max + warm`. Once the count is decided:

    scale-up    the first `min(desired - current, standby)` of it are activations (well under a second),
                the rest are new replicas
    scale-down  up to `warm - standby` idle replicas go back to standby (cheaper than a new boot later),
                the rest drain as always
    any tick    standbys missing from `warm` are booted, as far as `max + warm` leaves room (replicas being
                drained still run, so they count), unless new containers keep failing at start (the same back-off
                as a scale-up's); standbys above `warm` (the policy lowered it) are retired
"""

from __future__ import annotations

from dataclasses import replace

from autoscaler.policy.backoff import backing_off
from autoscaler.policy.model import PoolPolicy
from autoscaler.types import Decision, Observation, StandbyPlan

__all__ = ["plan_standby"]


def plan_standby(pool: PoolPolicy, observation: Observation, decision: Decision, now: float) -> Decision:
    """`decision` with its standby plan (and the reason saying it); unchanged for a pool without standbys."""
    current, desired, standby = decision.current, decision.desired, max(0, observation.standby)
    if not pool.enabled or current is None or desired is None or (pool.warm == 0 and standby == 0):
        return decision
    activate = min(desired - current, standby) if desired > current else 0
    to_standby = min(current - desired, max(0, pool.warm - standby)) if desired < current else 0
    left = standby - activate + to_standby
    retire = max(0, left - pool.warm)
    left -= retire
    draining = max(0, observation.draining) + (current - desired - to_standby if desired < current else 0)
    containers = desired + left + draining
    room = pool.max + pool.warm + (min(pool.surge, draining) if draining else 0) - containers
    boot = max(0, min(pool.warm - left, room))
    blocked = backing_off(decision.state.backoff, now) if boot else None
    if blocked is not None:
        boot = 0  # a standby that fails at start would only churn, like a replica
    plan = StandbyPlan(activate=activate, to_standby=to_standby, boot=boot, retire=retire)
    if not plan:
        return decision
    reason = f"{decision.reason}; standbys: {plan.describe()}"
    return replace(decision, standby=plan, reason=reason)
