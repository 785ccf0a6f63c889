"""Whether a decision may be carried out now, given what the backend sees of the target. Pure.

A scale-up waits while an earlier one is still starting (the count is about to change); a scale-down waits
only where the backend says so (Compose, while its own creates are in flight; Swarm never), and never when
it lowers the count the platform was asked for (Swarm's spec). A count the platform was already asked for is
not asked for again. Tasks the platform cannot
place are said in the reason, whatever the decision.
"""

from __future__ import annotations

from dataclasses import replace

from autoscaler.backends.base import TargetStatus
from autoscaler.types import Decision, Direction, StandbyPlan

__all__ = ["gate"]


def gate(decision: Decision, status: TargetStatus | None) -> Decision:
    if status is None:
        return decision
    if status.unplaceable:
        decision = replace(decision, reason=f"{decision.reason}; {status.detail}")
    direction = decision.direction
    if direction is Direction.HOLD:
        if decision.standby and not status.ready:
            # Creates in flight (standbys among them): booting more now would count them twice.
            return replace(decision, standby=StandbyPlan(), reason=f"{decision.reason}; waiting: {status.detail}")
        return decision
    if status.wanted is not None and decision.desired == status.wanted:
        return replace(
            decision, desired=decision.current, standby=StandbyPlan(),
            reason=f"{decision.reason}; {status.wanted} already asked for, holding" + (
                "" if status.unplaceable else f" ({status.detail})"
            ),
        )
    # Below the count the platform was asked for (a Swarm spec above what runs: tasks not placed or not started
    # yet), the "scale-up" lowers that count: nothing running is taken away, so it is never waited for.
    lowering = status.wanted is not None and decision.desired is not None and decision.desired < status.wanted
    allowed = (status.ready or lowering) if direction is Direction.UP else status.may_scale_down
    if allowed:
        return decision
    # Holding: a repair (or any action) that did not happen must not be remembered as one.
    return replace(
        decision, desired=decision.current, standby=StandbyPlan(),
        details={k: v for k, v in decision.details.items() if k != "repair"},
        reason=f"{decision.reason}; waiting: {status.detail or 'busy'}",
    )
