"""Record every task execution in PostgreSQL: one TaskRun row per task id, redeliveries counted.

Celery with ``acks_late`` delivers at least once: a message is redelivered after a worker crash, a lost
connection or an expired visibility timeout. The first start of a task id inserts its row; every later
start of the same id (redelivery or retry) increments ``attempts`` on that row instead of adding a row:

    INSERT ... ON CONFLICT (task_id) DO UPDATE SET attempts = attempts + 1 ...

so the count of redeliveries is reported, not hidden. A delivery that arrives after the task already
succeeded skips the work (``duplicates_skipped`` + 1): a redelivered notification sends no second mail.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any

from autoscaler.celery import PUBLISHED_AT_HEADER
from celery import Task
from celery.exceptions import Retry
from django.db import connection
from django.utils import timezone

from reports.models import TaskRun

__all__ = ["RecordedTask", "StartedRun", "record_failure", "record_retry", "record_start", "record_success"]

logger = logging.getLogger(__name__)

# acks_late + reject_on_worker_lost redeliver a task whose worker died: a task that kills its own process
# (a segfault, the OOM killer, an os._exit in a library) would run forever. After this many deliveries of
# the same message (retries are new messages and do not count), it is failed for good and acknowledged.
POISON_PREFIX = "poison: "


class PoisonTaskError(Exception):
    """Raised instead of running a task delivered too many times: Celery records FAILURE and acks it."""


def max_deliveries() -> int:
    from django.conf import settings  # noqa: PLC0415 - read at call time (tests override it)

    return max(1, int(getattr(settings, "CELERY_MAX_DELIVERIES", 5)))

_TABLE = TaskRun._meta.db_table
_SUCCEEDED = TaskRun.Status.SUCCEEDED.value
_STARTED = TaskRun.Status.STARTED.value

# Portable between PostgreSQL and SQLite >= 3.35 (the unit tests): ON CONFLICT ... DO UPDATE ... RETURNING.
_UPSERT_START = f"""
INSERT INTO {_TABLE} AS run
    (task_id, task_name, queue, status, attempts, duplicates_skipped, worker_hostname, published_at,
     first_started_at, started_at, error)
VALUES (%s, %s, %s, %s, 1, 0, %s, %s, %s, %s, '')
ON CONFLICT (task_id) DO UPDATE SET
    attempts = run.attempts + 1,
    duplicates_skipped = run.duplicates_skipped
        + CASE WHEN run.status = '{_SUCCEEDED}' THEN 1 ELSE 0 END,
    status = CASE WHEN run.status = '{_SUCCEEDED}' THEN run.status ELSE EXCLUDED.status END,
    worker_hostname = EXCLUDED.worker_hostname,
    started_at = EXCLUDED.started_at
RETURNING attempts, status
"""  # noqa: S608 - the table name is the model's own, every value is a bound parameter


@dataclass(frozen=True)
class StartedRun:
    """What the start of an execution found: the attempt number and whether the work is already done."""

    attempts: int
    already_succeeded: bool


def _published_at(request: Any) -> dt.datetime | None:
    """The publish time stamped by autoscaler.celery, if the message carries one."""
    raw = getattr(request, PUBLISHED_AT_HEADER, None)
    if raw is None:
        raw = (getattr(request, "headers", None) or {}).get(PUBLISHED_AT_HEADER)
    try:
        return dt.datetime.fromtimestamp(float(raw), tz=dt.UTC) if raw is not None else None
    except (TypeError, ValueError, OverflowError):
        return None


def record_start(
    *, task_id: str, task_name: str, queue: str, hostname: str, published_at: dt.datetime | None
) -> StartedRun:
    """Insert the task's row, or count one more attempt on it; returns the attempt number."""
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(
            _UPSERT_START,
            [task_id, task_name, queue, _STARTED, hostname, published_at, now, now],
        )
        attempts, status = cursor.fetchone()
    return StartedRun(attempts=int(attempts), already_succeeded=status == _SUCCEEDED)


def record_success(*, task_id: str, result: Any, runtime_ms: float) -> None:
    """Mark the task succeeded; finished_at is written once, by the first success."""
    TaskRun.objects.filter(task_id=task_id).exclude(status=_SUCCEEDED).update(
        status=_SUCCEEDED, finished_at=timezone.now(), runtime_ms=runtime_ms, result=result, error=""
    )


def record_retry(*, task_id: str, reason: str) -> None:
    """Mark the task as waiting for a retry (the retry is a new message with the same id)."""
    TaskRun.objects.filter(task_id=task_id, status=_STARTED).update(status=TaskRun.Status.RETRYING, error=reason[:2000])


def record_failure(*, task_id: str, error: str, runtime_ms: float) -> None:
    """Mark the task failed for good."""
    TaskRun.objects.filter(task_id=task_id).exclude(status=_SUCCEEDED).update(
        status=TaskRun.Status.FAILED, finished_at=timezone.now(), runtime_ms=runtime_ms, error=error[:2000]
    )


def _queue_of(task: Task) -> str:
    """The queue the message came from (delivery info), else the queue the task is routed to."""
    info = task.request.delivery_info or {}
    queue = info.get("routing_key") or info.get("queue")
    if queue:
        return str(queue)
    route = task.app.amqp.router.route({}, task.name)
    return str(route["queue"].name)


class RecordedTask(Task):  # type: ignore[misc]  # celery ships no type information
    """Base class: records start, success, retry and failure of every execution in TaskRun.

    ``__call__`` is overridden (Celery's tracer then calls it instead of ``run``), so the record wraps the
    task body in the same process, transaction-free: each statement autocommits.
    """

    abstract = True

    def poisoned(self, *args: Any, error: str, **kwargs: Any) -> None:
        """Called (with the task's arguments) when it is failed for good as poison: mark what it owns failed."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.id is None:  # a plain function call, not a task execution
            return self.run(*args, **kwargs)
        task_id = str(request.id)
        started = record_start(
            task_id=task_id,
            task_name=self.name,
            queue=_queue_of(self),
            hostname=str(request.hostname or "eager"),
            published_at=_published_at(request),
        )
        if started.attempts > 1:
            logger.warning("task %s[%s] delivered again: attempt %d", self.name, task_id, started.attempts)
        # Each retry is one more start too; what is left are deliveries of this very message.
        deliveries = started.attempts - int(request.retries or 0)
        if not started.already_succeeded and deliveries > max_deliveries():
            error = (f"{POISON_PREFIX}delivered {deliveries} times without finishing (its worker process died "
                     f"each time); failed for good, not run again")
            logger.error("task %s[%s] %s", self.name, task_id, error)
            record_failure(task_id=task_id, error=error, runtime_ms=0.0)
            self.poisoned(*args, error=error, **kwargs)
            raise PoisonTaskError(error)
        if started.already_succeeded:
            logger.warning("task %s[%s] already succeeded: work skipped", self.name, task_id)
            return None
        begin = time.perf_counter()
        try:
            result = self.run(*args, **kwargs)
        except Retry as exc:
            record_retry(task_id=task_id, reason=str(exc))
            raise
        except BaseException as exc:
            # BaseException: SoftTimeLimitExceeded and the like must be recorded too; re-raised as is.
            record_failure(task_id=task_id, error=f"{type(exc).__name__}: {exc}", runtime_ms=_ms_since(begin))
            raise
        record_success(task_id=task_id, result=_jsonable(result), runtime_ms=_ms_since(begin))
        return result


def _ms_since(begin: float) -> float:
    return round((time.perf_counter() - begin) * 1000.0, 3)


def _jsonable(value: Any) -> Any:
    """Keep small JSON-able results in the row; anything else is summarised by its type."""
    if value is None or isinstance(value, bool | int | float | str | list | dict):
        return value
    return {"type": type(value).__name__}
