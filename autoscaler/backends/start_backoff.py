"""Back-off for a pool whose new replicas keep failing to start. Pure bookkeeping; the clock is passed in.

A scale-up is one round: the containers it created. A round fails when one of them is found restarting,
exited with an error, OOM-killed or dead within `window` seconds of its creation; it succeeds when they
all still run after `window`. After a failed round the pool's next scale-up waits `base` seconds,
doubling with every failed round in a row up to `ceiling`; a successful round resets it. Without this, a
worker image that exits at start (restart: unless-stopped) made the pool below `min` create two more
containers every tick: 14 for a `max` of 10 after five ticks.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from autoscaler.policy.model import format_duration

__all__ = ["BACKOFF_BASE", "BACKOFF_CEILING", "FAILED_START_WINDOW", "StartBackoff"]

BACKOFF_BASE = 30.0
BACKOFF_CEILING = 600.0
# A replica that fails this soon after it was created failed to start (later, it failed at work).
FAILED_START_WINDOW = 120.0


@dataclass
class _Round:
    ids: frozenset[str]
    created_at: float


@dataclass
class StartBackoff:
    base: float = BACKOFF_BASE
    ceiling: float = BACKOFF_CEILING
    window: float = FAILED_START_WINDOW
    _rounds: dict[str, _Round] = field(default_factory=dict)
    _failed_rounds: dict[str, int] = field(default_factory=dict)
    _until: dict[str, float] = field(default_factory=dict)
    _why: dict[str, str] = field(default_factory=dict)

    def started(self, pool: str, ids: Collection[str], now: float) -> None:
        """A scale-up of `pool` created the containers `ids` at `now`."""
        if ids:
            self._rounds[pool] = _Round(frozenset(ids), now)

    def observe(self, pool: str, states: Mapping[str, str], now: float) -> str | None:
        """Judge the pool's last round from its containers' states (`id -> state`, "failed" for an exit
        with an error, OOM or dead). Returns a description of a round that has just failed, else None."""
        current = self._rounds.get(pool)
        if current is None:
            return None
        mine = {cid: states.get(cid, "gone") for cid in current.ids}
        failing = sorted(state for state in mine.values() if state in ("restarting", "failed"))
        if failing and now - current.created_at <= self.window:
            del self._rounds[pool]
            rounds = self._failed_rounds.get(pool, 0) + 1
            self._failed_rounds[pool] = rounds
            self._until[pool] = now + min(self.base * 2 ** (rounds - 1), self.ceiling)
            self._why[pool] = (
                f"{len(failing)} of {len(mine)} new replicas {failing[0]} within "
                f"{format_duration(now - current.created_at)} of their start"
            )
            return self._why[pool]
        if now - current.created_at > self.window:
            del self._rounds[pool]
            if all(state == "running" for state in mine.values()):
                self._failed_rounds.pop(pool, None)
                self._until.pop(pool, None)
                self._why.pop(pool, None)
        return None

    def blocked(self, pool: str, now: float) -> str | None:
        """Why `pool` may not scale up yet, or None."""
        until = self._until.get(pool)
        if until is None or now >= until:
            return None
        rounds = self._failed_rounds.get(pool, 0)
        return (
            f"new replicas keep failing ({rounds} failed scale-up{'s' if rounds > 1 else ''} in a row; last: "
            f"{self._why.get(pool, '?')}); backing off, next try in {format_duration(round(until - now))}"
        )
