"""Producer-side helper: refuse to publish while the Redis broker is nearly full.

`noeviction` alone does not keep a full broker safe. With kombu 5.x at `maxmemory`, a worker's BRPOP pops
a message and the write that records it as unacked (inside MULTI) is refused with OOM: the message is gone.
Queue declarations are refused too, so a restarted worker cannot start. The only safe full broker is one
that never gets there: producers stop publishing well below `maxmemory` (the web answers 503 and the
client retries), which leaves the workers the headroom their unacked bookkeeping needs while they drain
the queues. Use it before each publish::

    guard = PublishGuard(redis.Redis.from_url(broker_url))
    if (reason := guard.refusal()) is not None:
        return HttpResponse(reason, status=503)

The answer is cached for `ttl` seconds (one INFO per process per second, not one per request). A broker
with no `maxmemory` has no limit to keep below: nothing is refused, and `refusal` says so once in the log.
A broker that does not answer is not refused here either: the publish itself fails, loudly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol

from loguru import logger

__all__ = ["DEFAULT_LIMIT", "MemoryInfo", "PublishGuard", "memory_refusal"]

DEFAULT_LIMIT = 0.8


class MemoryInfo(Protocol):
    def info(self, section: str) -> Any: ...


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def memory_refusal(info: object, limit: float) -> tuple[str | None, bool]:
    """(why a publish is refused or None, whether the broker has a memory limit) from INFO memory."""
    if not isinstance(info, dict):
        return None, False
    used, maximum = _number(info.get("used_memory")), _number(info.get("maxmemory"))
    if used is None or not maximum:
        return None, False
    if used < limit * maximum:
        return None, True
    return (
        f"the task queue is nearly full: the broker uses {used / 2**20:.1f} MiB of its {maximum / 2**20:.1f} MiB "
        f"maxmemory, and publishing stops at {limit:.0%} so that workers can still take tasks; try again shortly"
    ), True


class PublishGuard:
    """Whether a producer may publish now, from the broker's INFO memory (cached for `ttl` seconds)."""

    def __init__(
        self,
        client: MemoryInfo,
        *,
        limit: float = DEFAULT_LIMIT,
        ttl: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < limit <= 1:
            raise ValueError(f"limit must be a fraction of maxmemory in (0, 1], not {limit!r}")
        self.client, self.limit, self.ttl, self._clock = client, limit, ttl, clock
        self._answer: str | None = None
        self._until = -math.inf
        self._warned_unlimited = False
        self._warned_unreadable = False

    def refusal(self) -> str | None:
        """Why publishing is refused now, or None."""
        now = self._clock()
        if now < self._until:
            return self._answer
        try:
            info = self.client.info("memory")
        except Exception as exc:  # any failure to ask: the publish itself will say it better
            if not self._warned_unreadable:
                self._warned_unreadable = True
                logger.warning(
                    "cannot read the broker's memory (INFO memory: {}): publishing is not guarded until it can", exc
                )
            info = None
        self._answer, limited = memory_refusal(info, self.limit)
        if isinstance(info, dict) and "maxmemory" in info and not limited and not self._warned_unlimited:
            self._warned_unlimited = True
            logger.warning(
                "the broker has no maxmemory: publishing is never refused, and a full host loses tasks "
                "(set maxmemory with maxmemory-policy noeviction)"
            )
        self._until = now + self.ttl
        return self._answer
