"""Plain data shared by every layer: what a source observed, what a pool remembers, what was decided.

Data flows one way: a metric source produces `QueueStats`, the loop adds the backend's replica count to
make an `Observation`, the pure policy core turns it into a `Decision`, and a backend acts on that.
Nothing here does I/O.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

__all__ = [
    "MAX_BACKOFF",
    "MAX_STORED_REPLICAS",
    "NO_STANDBY",
    "STANDBY_PHASES",
    "Decision",
    "Direction",
    "Observation",
    "PoolState",
    "QueueStats",
    "StandbyPlan",
    "StartBackoffState",
]

# A stored recommendation above this is not one any policy could have made (policies cap max at 10,000).
MAX_STORED_REPLICAS = 1_000_000
MAX_DRAINING = 10_000
# No start back-off is longer: a stored one that ends further ahead (clock skew, a forged record) ends this soon.
MAX_BACKOFF = 600.0
MAX_FAILED_ROUNDS = 10_000
MAX_BACKOFF_WHY = 300
# A warm standby's phase in the pool's state (absent: a standby, not capacity): "active" is capacity; the two
# others mean a remote-control reply never arrived, and the backend asks that one worker what it consumes.
STANDBY_PHASES = frozenset({"active", "activating", "returning"})
_CONTAINER_ID = re.compile(r"^([0-9a-f]{12,64}|[0-9a-z]{25})$")  # a container id, or a Swarm task id


class Direction(StrEnum):
    UP = "up"
    DOWN = "down"
    HOLD = "hold"


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One Celery queue as read from the broker.

    `latency_s` is the age of the oldest waiting message; None means unknown (messages without a
    publish-time stamp, or `latency_error` says why), which is not the same as 0 (nothing waiting).
    `error` set: the queue could not be read at all (e.g. one of its keys holds the wrong Redis type), and
    none of its numbers mean anything; `unacked_error` set: only `unacked` is unknown.
    """

    name: str
    waiting: int
    unacked: int = 0
    latency_s: float | None = 0.0
    error: str | None = None
    unacked_error: str | None = None
    latency_error: str | None = None


@dataclass(frozen=True, slots=True)
class Observation:
    """Everything the decision for one pool may look at in one tick.

    `metric_error` is set when the metric source failed; `current` is None when the backend could not
    say how many replicas run (then `backend_error` says why). `draining` counts replicas being stopped: not
    capacity (not in `current`), but still running, so they count toward the pool's `max`.
    """

    queues: tuple[QueueStats, ...]
    current: int | None
    metric_error: str | None = None
    backend_error: str | None = None
    draining: int = 0
    # Warm standbys: booted, consuming none of the pool's queues, not capacity; they count toward max + warm.
    standby: int = 0


@dataclass(frozen=True, slots=True)
class StandbyPlan:
    """What a decision asks of a pool's warm standbys, as counts (policy/standby.py makes it).

    `activate`: standbys made capacity, part of the scale-up (the rest of it is new replicas); `to_standby`:
    idle replicas returned to standby, part of the scale-down (the rest drain); `boot`: new standbys created to
    keep `warm` of them; `retire`: standbys above `warm` (the policy lowered it) removed.
    """

    activate: int = 0
    to_standby: int = 0
    boot: int = 0
    retire: int = 0

    def __bool__(self) -> bool:
        return bool(self.activate or self.to_standby or self.boot or self.retire)

    def describe(self) -> str:
        parts = [f"{n} {what}" for n, what in (
            (self.activate, "activated"), (self.to_standby, "returned to standby"),
            (self.boot, "standby booted"), (self.retire, "standby retired"),
        ) if n]
        return ", ".join(parts)


NO_STANDBY = StandbyPlan()


@dataclass(frozen=True, slots=True)
class StartBackoffState:
    """A pool's back-off after scale-ups whose replicas failed to become running replicas (see
    backends/start_backoff.py): how many failed in a row, until when the next one waits and why, and the
    scale-up being judged (its containers and when they were created). Kept in the pool's state, so that a new
    leader neither forgets the back-off nor the scale-up whose containers it has yet to judge.
    """

    failed_rounds: int = 0
    until: float | None = None
    why: str = ""
    round_ids: tuple[str, ...] = ()
    round_created: float | None = None

    def to_dict(self) -> dict[str, Any] | None:
        if self == StartBackoffState():
            return None
        return {
            "failed_rounds": self.failed_rounds, "until": self.until, "why": self.why,
            "round_ids": list(self.round_ids), "round_created": self.round_created,
        }

    def clamped(self, now: float) -> StartBackoffState:
        """No back-off ends more than MAX_BACKOFF after `now`, and no scale-up was created after `now`: a time
        ahead (clock skew, a forged record) would otherwise block scale-ups, or keep judging a round, for ever."""
        until = None if self.until is None else min(self.until, now + MAX_BACKOFF)
        created = None if self.round_created is None else min(self.round_created, now)
        if (until, created) == (self.until, self.round_created):
            return self
        return replace(self, until=until, round_created=created)

    @classmethod
    def from_dict(cls, raw: Any) -> StartBackoffState:
        """Parse the stored `backoff` object; ValueError naming the field on anything malformed or out of range."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError(f"backoff must be an object or null, not {raw!r:.80}")
        why = raw.get("why", "")
        if not isinstance(why, str) or len(why) > MAX_BACKOFF_WHY or not why.isprintable():
            raise ValueError(f"backoff.why must be printable text of at most {MAX_BACKOFF_WHY} characters")
        ids = raw.get("round_ids", [])
        if not isinstance(ids, list) or len(ids) > MAX_DRAINING or not all(
            isinstance(cid, str) and _CONTAINER_ID.match(cid) for cid in ids
        ):
            raise ValueError(f"backoff.round_ids must be a list of at most {MAX_DRAINING} container ids")
        until, created = raw.get("until"), raw.get("round_created")
        if ids and created is None:
            raise ValueError("backoff.round_created must be set when backoff.round_ids is not empty")
        try:
            rounds = _count(raw.get("failed_rounds", 0), MAX_FAILED_ROUNDS)
        except ValueError as exc:
            raise ValueError(f"backoff.failed_rounds: {exc}") from None
        return cls(
            failed_rounds=rounds,
            until=None if until is None else _finite_time(until, "backoff.until"),
            why=why,
            round_ids=tuple(ids),
            round_created=None if created is None else _finite_time(created, "backoff.round_created"),
        )


@dataclass(frozen=True, slots=True)
class PoolState:
    """What a pool remembers between ticks; persisted in Redis so a restarted controller keeps it.

    `recommendations` holds (time, replicas) pairs, one per change (a value stands until the next), pruned to
    the longest window the policy looks at.
    """

    last_scale_up: float | None = None
    last_scale_down: float | None = None
    recommendations: tuple[tuple[float, int], ...] = ()
    consecutive_failures: int = 0
    # Replicas being stopped (warm shutdown), with the time their grace ends: a controller that restarts
    # mid-drain takes the stops over instead of counting those workers as capacity or choosing new victims.
    draining: tuple[tuple[str, float], ...] = ()
    # The count this controller last brought the pool to: a lower count seen later was made by someone else
    # (a manual scale, `compose up` re-applying the file's count, replicas that exited) and is repaired.
    target: int | None = None
    # New replicas that keep failing at start: scale-ups wait (set by the backend, which judges them).
    backoff: StartBackoffState = StartBackoffState()
    # The count the last scale-up reached: within the up-cooldown only a higher one may follow at once.
    last_scale_up_to: int | None = None
    # Warm standbys that are not standbys any more, or whose change is unconfirmed: (container id, phase in
    # STANDBY_PHASES). Written by this controller only: the broker never says whether a standby was activated.
    standbys: tuple[tuple[str, str], ...] = ()

    def after_action(
        self, direction: Direction, now: float, desired: int | None = None, *, repair: bool = False
    ) -> PoolState:
        """The state once a scaling action in `direction` to `desired` has succeeded at `now`.

        A repair restores a count someone else lowered: it starts no cooldown (cooldowns pace changes of the
        recommendation, and the next genuine scale-up must not wait for a repair).
        """
        target = self.target if desired is None else desired
        if repair:
            return replace(self, target=target)
        if direction is Direction.UP:
            return replace(self, last_scale_up=now, last_scale_up_to=desired, target=target)
        if direction is Direction.DOWN:
            return replace(self, last_scale_down=now, target=target)
        return self

    def to_json(self) -> str:
        return json.dumps(
            {
                "last_scale_up": self.last_scale_up,
                "last_scale_down": self.last_scale_down,
                "recommendations": [list(r) for r in self.recommendations],
                "consecutive_failures": self.consecutive_failures,
                "draining": [list(d) for d in self.draining],
                "target": self.target,
                "backoff": self.backoff.to_dict(),
                "last_scale_up_to": self.last_scale_up_to,
                **({"standbys": [list(e) for e in self.standbys]} if self.standbys else {}),
            },
            separators=(",", ":"),
        )

    def clamped(self, now: float) -> PoolState:
        """This state with no time after `now`: a stored time in the future (clock skew between managers, or a
        forged record) would otherwise hold every cooldown for as long as it lies ahead."""
        backoff = self.backoff.clamped(now)
        if all(t is None or t <= now for t in (self.last_scale_up, self.last_scale_down)) and all(
            t <= now for t, _ in self.recommendations
        ) and backoff is self.backoff:
            return self
        return replace(
            self,
            last_scale_up=None if self.last_scale_up is None else min(self.last_scale_up, now),
            last_scale_down=None if self.last_scale_down is None else min(self.last_scale_down, now),
            recommendations=tuple((min(t, now), n) for t, n in self.recommendations),
            backoff=backoff,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> PoolState:
        """Parse a stored state; raises ValueError on anything malformed, non-finite or out of range."""
        raw: Any = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("pool state must be a JSON object")
        recommendations = raw.get("recommendations", [])
        if not isinstance(recommendations, list):
            raise ValueError("recommendations must be a list")
        recs = []
        for entry in recommendations:
            if not isinstance(entry, list) or len(entry) != 2:
                raise ValueError(f"a recommendation must be [time, replicas], not {entry!r:.80}")
            recs.append((_finite_time(entry[0], "a recommendation's time"), _count(entry[1], MAX_STORED_REPLICAS)))
        draining = raw.get("draining", [])
        if not isinstance(draining, list) or len(draining) > MAX_DRAINING:
            raise ValueError(f"draining must be a list of at most {MAX_DRAINING} [container id, deadline] pairs")
        drains = []
        for entry in draining:
            if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str) \
                    or not _CONTAINER_ID.match(entry[0]):
                raise ValueError(f"a draining entry must be [container id, deadline], not {entry!r:.80}")
            drains.append((entry[0], _finite_time(entry[1], "a draining deadline")))
        standbys = raw.get("standbys", [])
        if not isinstance(standbys, list) or len(standbys) > MAX_DRAINING:
            raise ValueError(f"standbys must be a list of at most {MAX_DRAINING} [container id, phase] pairs")
        for entry in standbys:
            if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str) \
                    or not _CONTAINER_ID.match(entry[0]) or entry[1] not in STANDBY_PHASES:
                raise ValueError(f"a standbys entry must be [container id, one of {sorted(STANDBY_PHASES)}], "
                                 f"not {entry!r:.80}")
        up, down, target = raw.get("last_scale_up"), raw.get("last_scale_down"), raw.get("target")
        up_to = raw.get("last_scale_up_to")
        return cls(
            last_scale_up=None if up is None else _finite_time(up, "last_scale_up"),
            last_scale_down=None if down is None else _finite_time(down, "last_scale_down"),
            recommendations=tuple(recs),
            consecutive_failures=_count(raw.get("consecutive_failures", 0), 2**31),
            draining=tuple(drains),
            target=None if target is None else _count(target, MAX_STORED_REPLICAS),
            backoff=StartBackoffState.from_dict(raw.get("backoff")),
            last_scale_up_to=None if up_to is None else _count_of(up_to, MAX_STORED_REPLICAS, "last_scale_up_to"),
            standbys=tuple((str(i), str(p)) for i, p in standbys),
        )


def _finite_time(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite, non-negative number, not {value!r:.80}")
    return float(value)


def _count_of(value: Any, limit: int, what: str) -> int:
    try:
        return _count(value, limit)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def _count(value: Any, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise ValueError(f"expected a whole number from 0 to {limit}, not {value!r:.80}")
    return value


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one decision: the count to reach and why, plus the pool's next state.

    `desired == current` means hold. `metric` is the value the strategy saw (None when unavailable),
    `recommendation` what the strategy asked for before cooldowns, stabilization and step limits.
    """

    pool: str
    current: int | None
    desired: int | None
    reason: str
    state: PoolState
    metric: float | None = None
    recommendation: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    standby: StandbyPlan = StandbyPlan()

    @property
    def direction(self) -> Direction:
        if self.current is None or self.desired is None or self.desired == self.current:
            return Direction.HOLD
        return Direction.UP if self.desired > self.current else Direction.DOWN

    @property
    def acts(self) -> bool:
        """A change of the count, or work on the warm standbys (booting them changes no count)."""
        return self.direction is not Direction.HOLD or bool(self.standby)
