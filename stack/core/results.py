"""Redis result backend for processes that publish tasks but never wait on their results.

Celery's Redis backend subscribes the publishing process to a pub/sub channel for EVERY task published
with results enabled (``on_task_call``), so that a later ``.get()`` can wait without polling. The web
never calls ``.get()``: it reads a report's state with one GET (``AsyncResult.state``). The stock
behaviour would therefore pile up one subscription per POST /reports/ in each gunicorn process, with the
unread result messages queued in Redis' output buffer for that connection, and tie every publish to the
result consumer's reconnect loop (20 tries, 1 s apart: a 19 s POST, then "the Celery application must be
restarted") while Redis is down. Storing results (workers) and reading them by key are unchanged.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend

__all__ = ["KeyOnlyRedisBackend"]


class KeyOnlyRedisBackend(RedisBackend):  # type: ignore[misc]  # celery ships no type information
    """RedisBackend without the per-task pub/sub subscription at publish time."""

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Subscribe to nothing: results are read by key (``AsyncResult.state``), never awaited."""
