"""Whether a pool's start back-off holds its scale-ups now, and the reason to give. Pure; the clock is passed in.

The back-off is judged by the backend (backends/start_backoff.py) and kept in the pool's state: both the
decision (which holds a scale-up, saying why) and the backend (which refuses one) read it from here.
"""

from __future__ import annotations

from autoscaler.policy.model import format_duration
from autoscaler.types import StartBackoffState

__all__ = ["backing_off"]


def backing_off(backoff: StartBackoffState, now: float) -> str | None:
    """Why the pool may not scale up yet, or None."""
    if backoff.until is None or now >= backoff.until:
        return None
    rounds = backoff.failed_rounds
    return (
        f"new replicas keep failing ({rounds} failed scale-up{'s' if rounds != 1 else ''} in a row; last: "
        f"{backoff.why or '?'}); backing off, next try in {format_duration(round(backoff.until - now))}"
    )
