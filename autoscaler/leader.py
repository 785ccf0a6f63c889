"""Leader election in Redis, and the fence that keeps a replica that lost it from acting.

The lock is set-if-absent with expiry, renewed each tick; a standby polls faster than the leader renews and
takes over once the lock expires. Docker takes no fencing token, so "only the leader acts" is made to hold
this way: every Docker call and every state write is preceded by `Fence.check`, which renews the lease in
Redis only if this replica still holds it (one round trip) and raises `LeaseLostError` otherwise. A leader
that was paused (SIGSTOP, a VM freeze, a long GC) past its lease therefore makes no call after it resumes;
the residual window is the one call that was already in flight when it lost the lease (bounded by the
Docker API timeout; README, "Running several controllers").
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import redis
from loguru import logger

from autoscaler.backends.base import LeaseLostError

__all__ = ["Fence", "LeaderLock", "Lease"]

# The lease term a background action (and whatever it runs in its context) was begun under; None elsewhere.
_ACTION_TERM: ContextVar[int | None] = ContextVar("autoscaler_action_term", default=None)

# 2: taken now (it was free or expired), 1: renewed (already ours), 0: another replica holds it.
_ACQUIRE_OR_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
-- Held by another name. A lease never outlives two of ours from the moment we see it: a lock written
-- without an expiry (by hand, or by a broker client when the lock shares the broker) expires.
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -1 or ttl > 2 * tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
end
return 0
"""

# Renew only: a lease that lapsed is not silently taken back in the middle of a tick.
_CONFIRM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease(enum.IntEnum):
    """What `acquire_or_renew` found; true when this replica leads."""

    HELD_BY_OTHER = 0
    RENEWED = 1
    ACQUIRED = 2


class LeaderLock:
    def __init__(self, client: redis.Redis, *, key: str, instance_id: str, ttl: float) -> None:
        self._client = client
        self.key = key
        self.instance_id = instance_id
        self.ttl = ttl
        self._acquire = client.register_script(_ACQUIRE_OR_RENEW)
        self._confirm = client.register_script(_CONFIRM)
        self._release = client.register_script(_RELEASE)
        self._term = 0
        # Held across the acquiring script and the count: a thread whose lease check passed only because this
        # call took the lock reads the new term, never the old one.
        self._term_lock = threading.Lock()

    @property
    def term(self) -> int:
        """How many times this replica took the lock (renewals not counted). A lease held under an earlier term
        had a gap in between, in which another replica may have led."""
        with self._term_lock:
            return self._term

    def acquire_or_renew(self, ttl: float | None = None) -> Lease:
        """Take or renew the lock for `ttl` seconds (default: the last one used). Raises redis errors."""
        if ttl is not None:
            self.ttl = ttl
        with self._term_lock:
            lease = Lease(int(self._acquire(keys=[self.key], args=[self.instance_id, self._ttl_ms()])))
            if lease is Lease.ACQUIRED:
                self._term += 1
        return lease

    def confirm(self) -> bool:
        """Renew the lease if this replica still holds it; False if it does not, or if Redis does not answer.

        Fails closed: in a partition, another replica that still reaches Redis may take the lock (and shorten
        a foreign lease to two of its own), so a lease this replica cannot confirm is not one it may act on.
        """
        try:
            return bool(self._confirm(keys=[self.key], args=[self.instance_id, self._ttl_ms()]))
        except redis.RedisError as exc:
            logger.warning("cannot confirm the leader lease ({}): not acting on it", exc)
            return False

    def release(self) -> None:
        """Give the lock up (on a clean stop) so a standby takes over at its next poll."""
        self._release(keys=[self.key], args=[self.instance_id])

    def holder(self) -> str | None:
        value = self._client.get(self.key)
        if value is None:
            return None
        # Any broker client can write the key when the lock shares the broker: shown, never trusted or fatal.
        return value.decode(errors="backslashreplace") if isinstance(value, bytes) else str(value)

    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))


class Fence:
    """Called before every Docker call and state write: raises `LeaseLostError` unless the lease is still ours.

    `lost` stays set once a check failed, until the controller re-arms the fence at its next leadership
    check: nothing else of that tick (other pools, background drains, the state write) acts.
    """

    def __init__(self, lock: LeaderLock | None) -> None:
        self._lock = lock
        self.lost: str | None = None

    def rearm(self) -> None:
        self.lost = None

    def term(self) -> int:
        """The lease's term (`LeaderLock.term`): work begun under an earlier one must not go on as it was."""
        return self._lock.term if self._lock is not None else 0

    @contextmanager
    def acting_under(self, term: int) -> Iterator[None]:
        """Within it, this thread's fence checks also fail once the lease's term is no longer `term`.

        A background action decided under one lease must not go on after the lease lapsed, another replica led,
        and this one took the lock again: the re-armed fence and the renewed lease would let it through.
        """
        token = _ACTION_TERM.set(term)
        try:
            yield
        finally:
            _ACTION_TERM.reset(token)

    def stale(self) -> bool:
        """True in an action begun under an earlier term (see `acting_under`)."""
        bound = _ACTION_TERM.get()
        return bound is not None and bound != self.term()

    def check(self, what: str) -> None:
        if self._lock is None:
            return
        if self.lost is None and self._lock.confirm():
            # The term is read after the lease was confirmed: a confirm that passed only because the lock was
            # taken again meanwhile reads the new term (LeaderLock counts it under the same lock).
            if self.stale():
                # Not `lost`: the lease is ours, only this action is out of date; the new term's work goes on.
                raise LeaseLostError(
                    f"this action was begun under an earlier leader lease (term {_ACTION_TERM.get()}, now "
                    f"{self.term()}; before '{what}'): another replica may have acted in between"
                )
            return
        if self.lost is None:
            self.lost = what
            logger.warning(
                "lost the leader lease before '{}': this replica makes no further Docker call or state write "
                "until it holds the lock again (another replica may be acting)", what
            )
        raise LeaseLostError(f"this replica lost the leader lease (before '{what}')")
