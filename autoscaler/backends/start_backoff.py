"""Back-off for a pool whose new replicas keep failing to become running replicas. Pure bookkeeping; the clock
is passed in.

A scale-up is one round: the containers it created. A round fails when a start call fails (the host port is
taken, the image is gone), or when one of its containers is found restarting, exited (with any code: exit 0 at
once under `restart: no` or `on-failure` is no worker either), OOM-killed or dead within `window` seconds of its
creation, unless this controller stopped it (`spare`: a scale-down or unhealthy replacement victim). It
succeeds when they all still run after `window`. After a failed round the pool's next scale-up waits `base`
seconds, doubling with every failed round in a row up to `ceiling`; a successful round resets it. Without this,
a worker image that exits at start made the pool below `min` create two more containers every tick: 14 for a
`max` of 10 after five ticks (restart: unless-stopped), 30 creates in 135 s (exit 0, restart: no).

The back-off and the round being judged are kept in the pool's state (`snapshot` / `restore`), so that a new
leader neither resets the back-off nor forgets to judge the last scale-up.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace

from autoscaler.policy.backoff import backing_off
from autoscaler.policy.model import format_duration
from autoscaler.types import MAX_BACKOFF, MAX_BACKOFF_WHY, MAX_FAILED_ROUNDS, StartBackoffState

__all__ = ["BACKOFF_BASE", "BACKOFF_CEILING", "FAILED_START_WINDOW", "StartBackoff"]

BACKOFF_BASE = 30.0
BACKOFF_CEILING = MAX_BACKOFF
# A replica that fails this soon after it was created failed to start (later, it failed at work).
FAILED_START_WINDOW = 120.0
# Container states (and "failed": exited with an error, OOM-killed or dead) of a replica that is not working.
FAILING_STATES = frozenset({"restarting", "exited", "dead", "failed"})


@dataclass
class StartBackoff:
    base: float = BACKOFF_BASE
    ceiling: float = BACKOFF_CEILING
    window: float = FAILED_START_WINDOW
    _pools: dict[str, StartBackoffState] = field(default_factory=dict)
    _unreported: dict[str, str] = field(default_factory=dict)  # pool -> a failed start observe() has yet to report

    def snapshot(self, pool: str) -> StartBackoffState:
        """The pool's back-off and round, to keep in its state."""
        return self._pools.get(pool, StartBackoffState())

    def restore(self, pool: str, saved: StartBackoffState, now: float) -> None:
        """Take over a back-off kept in the pool's state (a new leader); times ahead of `now` are clamped."""
        saved = saved.clamped(now)
        if saved.until is not None and saved.until > now + self.ceiling:
            saved = replace(saved, until=now + self.ceiling)
        self._pools[pool] = saved

    def started(self, pool: str, ids: Collection[str], now: float, *, failed: int = 0, error: str = "") -> None:
        """A scale-up of `pool` created and started the containers `ids` at `now`; `failed` more could not be
        created or started (`error`: the first such error). A failed start fails the round at once."""
        state = self.snapshot(pool)
        if failed:
            why = f"{failed} of {failed + len(ids)} new replicas failed to start: {_printable(error)}"
            self._pools[pool] = self._failed(state, why[:MAX_BACKOFF_WHY], now)
            self._unreported[pool] = self._pools[pool].why
        elif ids:
            self._pools[pool] = replace(state, round_ids=tuple(sorted(ids)), round_created=now)

    def spare(self, pool: str, ids: Collection[str]) -> None:
        """This controller is stopping `ids` (our own victims): their exit says nothing about their start."""
        state = self._pools.get(pool)
        if state is None or not state.round_ids or not ids:
            return
        kept = tuple(cid for cid in state.round_ids if cid not in ids)
        # A round left with nothing to judge has no verdict: it neither fails nor resets the back-off.
        self._pools[pool] = replace(state, round_ids=kept, round_created=state.round_created if kept else None)

    def observe(self, pool: str, states: Mapping[str, str], now: float) -> str | None:
        """Judge the pool's last round from its containers' states (`id -> state`: Docker's, or "failed" for an
        exit with an error, OOM or dead). Returns a description of a round that has just failed, else None."""
        unreported = self._unreported.pop(pool, None)
        if unreported is not None:
            return unreported
        state = self._pools.get(pool)
        if state is None or not state.round_ids or state.round_created is None:
            return None
        age = now - state.round_created
        mine = {cid: states.get(cid, "gone") for cid in state.round_ids}
        failing = sorted(s for s in mine.values() if s in FAILING_STATES)
        if failing and age <= self.window:
            why = f"{len(failing)} of {len(mine)} new replicas {failing[0]} within {format_duration(round(age))}"
            self._pools[pool] = self._failed(state, why, now)
            return why
        if age > self.window:
            if all(s == "running" for s in mine.values()):
                self._pools.pop(pool, None)  # a round that works resets the back-off
            else:
                self._pools[pool] = replace(state, round_ids=(), round_created=None)
        return None

    def blocked(self, pool: str, now: float) -> str | None:
        """Why `pool` may not scale up yet, or None."""
        return backing_off(self.snapshot(pool), now)

    def _failed(self, state: StartBackoffState, why: str, now: float) -> StartBackoffState:
        rounds = min(state.failed_rounds + 1, MAX_FAILED_ROUNDS)
        # The exponent is capped: a count restored from a record must not overflow the float.
        delay = min(self.base * 2 ** min(rounds - 1, 32), self.ceiling)
        return StartBackoffState(failed_rounds=rounds, until=now + delay, why=why)


def _printable(text: str) -> str:
    """One line of printable text: the why is logged, shown by `status` and validated as such when read back."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())
