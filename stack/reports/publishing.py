"""The broker as producers see it: one client per process, and the guard that stops publishing before it fills.

At maxmemory with noeviction kombu loses the message a worker pops (its unacked write is refused), so every
producer of this app -- POST /reports/ and loadgen -- asks `publish_refusal()` first (autoscaler/publish_guard.py).
"""

from __future__ import annotations

from functools import cache

import redis
from autoscaler.publish_guard import PublishGuard
from django.conf import settings

__all__ = ["broker", "publish_guard", "publish_refusal"]


@cache
def broker() -> redis.Redis:
    return redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_timeout=2, socket_connect_timeout=2)


@cache
def publish_guard() -> PublishGuard | None:
    if not settings.CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
        return None  # not a Redis broker (the unit tests' in-memory one): no maxmemory to keep below
    return PublishGuard(broker(), limit=settings.BROKER_PUBLISH_LIMIT_PERCENT / 100)


def publish_refusal() -> str | None:
    """Why publishing is refused now (the broker is nearly full), or None."""
    guard = publish_guard()
    return None if guard is None else guard.refusal()
