"""Compare what was enqueued with what completed, per queue (used by taskreport and /tasks/summary).

Enqueued work is every EnqueuedTask row (written by loadgen before each publish) plus every Report row
(POST /reports/ writes one; its id is the task id). Completed means a TaskRun row with status succeeded.
A task counts once however often it was delivered; ``redelivered`` lists the ids with attempts > 1.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from reports.models import EnqueuedTask, Report, TaskRun
from reports.recording import POISON_PREFIX

__all__ = ["Accounting", "QueueCounts", "account", "percentiles"]

_CHUNK = 2000


@dataclass
class QueueCounts:
    """Counts for one queue."""

    enqueued: int = 0
    succeeded: int = 0
    failed: int = 0
    in_progress: int = 0
    not_started: int = 0
    redelivered: int = 0
    poisoned: int = 0  # failed for good after too many deliveries (reports/recording.py)
    duplicates_skipped: int = 0
    attempts: int = 0
    wait_ms: list[float] = field(default_factory=list)

    @property
    def missing(self) -> int:
        """Enqueued but not (yet) succeeded."""
        return self.enqueued - self.succeeded

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready counts, with queue-wait percentiles (publish stamp -> first start)."""
        return {
            "enqueued": self.enqueued,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "in_progress": self.in_progress,
            "not_started": self.not_started,
            "missing": self.missing,
            "redelivered": self.redelivered,
            "poisoned": self.poisoned,
            "duplicates_skipped": self.duplicates_skipped,
            "attempts": self.attempts,
            "wait_ms": percentiles(self.wait_ms),
        }


@dataclass
class Accounting:
    """The comparison for one run label (or all runs) and its id lists."""

    run: str | None
    queues: dict[str, QueueCounts]
    missing_ids: list[str]
    failed_ids: list[str]
    redelivered_ids: list[str]
    unexpected_ids: list[str]

    @property
    def ok(self) -> bool:
        """True when every enqueued task succeeded."""
        return not self.missing_ids

    def as_dict(self, *, limit: int | None = None) -> dict[str, Any]:
        """JSON-ready report; id lists cut to ``limit`` entries (None: all)."""
        totals = QueueCounts()
        for counts in self.queues.values():
            for name in (
                "enqueued",
                "succeeded",
                "failed",
                "in_progress",
                "not_started",
                "redelivered",
                "duplicates_skipped",
                "attempts",
            ):
                setattr(totals, name, getattr(totals, name) + getattr(counts, name))
            totals.wait_ms.extend(counts.wait_ms)
        return {
            "run": self.run,
            "ok": self.ok,
            "queues": {name: counts.as_dict() for name, counts in self.queues.items()},
            "totals": totals.as_dict(),
            "unexpected": len(self.unexpected_ids),
            "missing_ids": self.missing_ids[:limit],
            "failed_ids": self.failed_ids[:limit],
            "redelivered_ids": self.redelivered_ids[:limit],
            "unexpected_ids": self.unexpected_ids[:limit],
        }


def percentiles(values: list[float], *, digits: int = 1) -> dict[str, float | None]:
    """p50, p95 and max of ``values`` (None when empty)."""
    if not values:
        return {"p50": None, "p95": None, "max": None}
    ordered = sorted(values)
    if len(ordered) == 1:
        single = round(ordered[0], digits)
        return {"p50": single, "p95": single, "max": single}
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50": round(cuts[49], digits), "p95": round(cuts[94], digits), "max": round(ordered[-1], digits)}


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _enqueued(run: str | None, queue: str | None) -> dict[str, str]:
    """task_id -> queue of the enqueued work in scope."""
    tasks = EnqueuedTask.objects.all()
    reports = Report.objects.all()
    if run is not None:
        tasks = tasks.filter(run=run)
        reports = reports.filter(run=run)
    if queue is not None:
        tasks = tasks.filter(queue=queue)
    enqueued = dict(tasks.values_list("task_id", "queue").iterator(chunk_size=_CHUNK))
    if queue in (None, settings.QUEUE_CPU):
        for report_id in reports.values_list("pk", flat=True).iterator(chunk_size=_CHUNK):
            enqueued.setdefault(str(report_id), settings.QUEUE_CPU)
    return enqueued


def _runs(task_ids: Iterable[str] | None) -> Iterator[TaskRun]:
    fields = ("task_id", "queue", "status", "attempts", "duplicates_skipped", "published_at", "first_started_at",
              "error")
    if task_ids is None:
        yield from TaskRun.objects.only(*fields).iterator(chunk_size=_CHUNK)
        return
    for chunk in _chunks(sorted(task_ids), _CHUNK):
        yield from TaskRun.objects.only(*fields).filter(task_id__in=chunk)


def account(*, run: str | None = None, queue: str | None = None) -> Accounting:
    """Compare enqueued and completed tasks for ``run`` (None: everything) and ``queue`` (None: all)."""
    enqueued = _enqueued(run, queue)
    names = [queue] if queue else list(settings.QUEUES)
    queues = {name: QueueCounts() for name in names}
    for name in set(enqueued.values()) - set(queues):
        queues[name] = QueueCounts()
    for task_queue in enqueued.values():
        queues[task_queue].enqueued += 1

    seen: set[str] = set()
    failed: list[str] = []
    in_progress: list[str] = []
    redelivered: list[str] = []
    unexpected: list[str] = []
    scoped = run is not None or queue is not None
    for task_run in _runs(enqueued.keys() if scoped else None):
        task_queue = enqueued.get(task_run.task_id)
        if task_queue is None:
            unexpected.append(task_run.task_id)
            continue
        seen.add(task_run.task_id)
        counts = queues[task_queue]
        counts.attempts += task_run.attempts
        counts.duplicates_skipped += task_run.duplicates_skipped
        if task_run.attempts > 1:
            counts.redelivered += 1
            redelivered.append(task_run.task_id)
        if task_run.status == TaskRun.Status.SUCCEEDED:
            counts.succeeded += 1
        elif task_run.status == TaskRun.Status.FAILED:
            counts.failed += 1
            failed.append(task_run.task_id)
            if task_run.error.startswith(POISON_PREFIX):
                counts.poisoned += 1
        else:
            counts.in_progress += 1
            in_progress.append(task_run.task_id)
        if task_run.published_at is not None:
            wait = (task_run.first_started_at - task_run.published_at).total_seconds() * 1000.0
            counts.wait_ms.append(max(wait, 0.0))

    not_started = [task_id for task_id in enqueued if task_id not in seen]
    for task_id in not_started:
        queues[enqueued[task_id]].not_started += 1
    return Accounting(
        run=run,
        queues=queues,
        # Missing: enqueued and not succeeded (never started, still running, or failed).
        missing_ids=sorted(not_started + in_progress + failed),
        failed_ids=sorted(failed),
        redelivered_ids=sorted(redelivered),
        unexpected_ids=sorted(unexpected),
    )
