"""Producer-side helper: stamp every published Celery task with its publish time.

The autoscaler measures queue latency as the age of the oldest waiting message. Redis lists carry no
timestamps, so producers must stamp one. One line in the Celery app module installs it::

    import autoscaler.celery
    autoscaler.celery.install()

Messages published before the helper was installed carry no stamp; the metric source then reports the
latency of that queue as unknown rather than zero.
"""

from __future__ import annotations

import time
from typing import Any

from celery.signals import before_task_publish

__all__ = ["PUBLISHED_AT_HEADER", "install", "stamp_headers"]

# The same name is read by the metric source's Lua script (sources/celery_redis.lua).
PUBLISHED_AT_HEADER = "x-autoscaler-published-at"

_installed = False


def stamp_headers(headers: dict[str, Any] | None, now: float | None = None) -> None:
    """Stamp the time this message enters the queue.

    Always overwritten: a retry or a re-publish is a new wait in the queue, and a stamp copied from the
    first attempt would report its countdown as backlog age.
    """
    if headers is None:
        return
    headers[PUBLISHED_AT_HEADER] = time.time() if now is None else now


def _on_before_task_publish(*, headers: dict[str, Any] | None = None, **_: Any) -> None:
    stamp_headers(headers)


def install() -> None:
    """Connect the stamping handler to Celery's ``before_task_publish`` signal (idempotent)."""
    global _installed  # noqa: PLW0603 - a process-wide, install-once switch is the point
    if _installed:
        return
    before_task_publish.connect(_on_before_task_publish, weak=False)
    _installed = True
