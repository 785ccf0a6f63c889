"""JSON endpoints. POST /reports/ only INSERTs a row and publishes a message: the work runs in a worker."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from celery.result import AsyncResult
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods

from reports.accounting import account
from reports.models import Report, TaskRun
from reports.publishing import broker, publish_refusal
from reports.tasks import DEFAULT_REPORT_ROWS, DEFAULT_REPORT_WORK, generate_report

__all__ = ["create_report", "healthz", "report_detail", "slow", "tasks_summary"]

logger = logging.getLogger(__name__)

MAX_REPORT_ROWS = 1_000_000
MAX_REPORT_WORK = 100_000


def _error(status: int, message: str) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


def _bounded_int(payload: dict[str, Any], name: str, default: int, maximum: int) -> int:
    value = payload.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise ValueError(f"{name} must be an integer between 0 and {maximum}")
    return value


@csrf_exempt  # a JSON API without cookies or sessions: there is no ambient credential to forge
@require_http_methods(["POST"])
def create_report(request: HttpRequest) -> JsonResponse:
    """Enqueue a report: one INSERT, one publish, answer 202 with the report id at once."""
    try:
        payload = json.loads(request.body or b"{}")
        if not isinstance(payload, dict):
            raise ValueError("the body must be a JSON object")  # noqa: TRY301
        rows = _bounded_int(payload, "rows", DEFAULT_REPORT_ROWS, MAX_REPORT_ROWS)
        work = _bounded_int(payload, "work", DEFAULT_REPORT_WORK, MAX_REPORT_WORK)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        return _error(400, str(exc))
    if (full := publish_refusal()) is not None:
        # Refused at the door, before the INSERT: nothing is half-accepted, and the client knows to retry.
        refused = _error(503, full)
        refused["Retry-After"] = "5"
        return refused
    started = time.perf_counter()
    report = Report.objects.create(rows=rows, work=work)
    inserted = time.perf_counter()
    report_id = str(report.pk)
    try:
        # The report id is the task id: the worker's TaskRun row and this row share it.
        generate_report.apply_async(args=[report_id], task_id=report_id)
    except Exception:  # kombu raises OperationalError and friends once the publish retries are spent
        logger.exception("publishing report %s failed", report_id)
        # Nothing was enqueued and the client gets no id: leave no row that would count as enqueued work.
        Report.objects.filter(pk=report.pk).delete()
        return _error(503, "the task queue is unavailable; try again")
    published = time.perf_counter()
    response = JsonResponse({"id": report_id, "status": report.status, "url": f"/reports/{report_id}/"}, status=202)
    # Where the time went, for load tests: the INSERT (with its commit) and the publish.
    response["Server-Timing"] = (
        f"db;dur={(inserted - started) * 1000:.2f}, publish;dur={(published - inserted) * 1000:.2f}"
    )
    return response


@require_GET
def report_detail(request: HttpRequest, report_id: uuid.UUID) -> JsonResponse:
    """A report's status and, once done, its result (the rendered HTML is summarised, not included)."""
    try:
        report = Report.objects.get(pk=report_id)
    except Report.DoesNotExist:
        return _error(404, "no such report")
    run = TaskRun.objects.filter(task_id=str(report_id)).only("status", "attempts", "worker_hostname").first()
    body: dict[str, Any] = {
        "id": str(report.pk),
        "status": report.status,
        "rows": report.rows,
        "work": report.work,
        "created_at": report.created_at.isoformat(),
        "finished_at": report.finished_at.isoformat() if report.finished_at else None,
        "result": report.result,
        "error": report.error or None,
        "attempts": run.attempts if run else 0,
        "worker": run.worker_hostname if run else None,
    }
    if report.status in (Report.Status.QUEUED, Report.Status.RUNNING):
        # The Celery state from the result backend (kept for this task only, for an hour).
        body["task_state"] = AsyncResult(str(report_id), app=generate_report.app).state
    return JsonResponse(body)


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """200 when PostgreSQL and the Redis broker answer, else 503 with what failed."""
    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        checks["db"] = "ok"
    except Exception as exc:  # report any failure, do not raise from a health check
        checks["db"] = f"error: {type(exc).__name__}"
    try:
        broker().ping()
        checks["broker"] = "ok"
    except Exception as exc:  # report any failure, do not raise from a health check
        checks["broker"] = f"error: {type(exc).__name__}"
    healthy = all(value == "ok" for value in checks.values())
    return JsonResponse({"status": "ok" if healthy else "unhealthy", **checks}, status=200 if healthy else 503)


@require_GET
def slow(request: HttpRequest) -> JsonResponse:
    """Answer after ``ms`` milliseconds (capped at SLOW_MAX_MS): the io_intensive tasks' remote call."""
    try:
        ms = int(request.GET.get("ms", "100"))
    except ValueError:
        return _error(400, "ms must be an integer")
    if not 0 <= ms <= settings.SLOW_MAX_MS:
        return _error(400, f"ms must be between 0 and {settings.SLOW_MAX_MS}")
    time.sleep(ms / 1000.0)
    return JsonResponse({"slept_ms": ms})


@require_GET
def tasks_summary(request: HttpRequest) -> JsonResponse:
    """Per queue: enqueued, succeeded, failed, missing, redelivered; plus the broker's queue lengths.

    ``?run=LABEL`` limits it to one loadgen run, ``?queue=NAME`` to one queue, ``?ids=1`` adds id lists.
    """
    run = request.GET.get("run") or None
    queue = request.GET.get("queue") or None
    if queue is not None and queue not in settings.QUEUES:
        return _error(400, f"queue must be one of {', '.join(settings.QUEUES)}")
    body = account(run=run, queue=queue).as_dict(limit=100)
    if request.GET.get("ids") not in {"1", "true", "yes"}:
        for key in ("missing_ids", "failed_ids", "redelivered_ids", "unexpected_ids"):
            del body[key]
    try:
        client = broker()
        body["broker"] = {
            "queue_length": {name: client.llen(name) for name in settings.QUEUES},
            "unacked": client.hlen("unacked"),
        }
    except Exception as exc:  # the counts from the database are still worth answering with
        body["broker"] = {"error": type(exc).__name__}
    return JsonResponse(body)
