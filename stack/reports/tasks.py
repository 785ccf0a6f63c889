"""The background work, one task per queue (routed by name in settings.CELERY_TASK_ROUTES).

- ``send_notification`` -> ``fast``: send one mail through the configured (file-based) backend, after
  ``NOTIFICATION_LATENCY_MS`` (default 0): the mail provider's round trip, for load tests.
- ``generate_report`` -> ``cpu_intensive``: aggregate Sale rows in PostgreSQL, then bootstrap confidence
  intervals and render HTML in Python (CPU-bound; ``rows`` and ``work`` set its size).
- ``fetch_slow`` -> ``io_intensive``: HTTP GET on the web service's own ``/slow?ms=N``, with a timeout.

Every task derives from RecordedTask: each execution is recorded in TaskRun, once per task id.
"""

from __future__ import annotations

import hashlib
import os
import random
import statistics
import time
import urllib.error
import urllib.parse
import urllib.request
from decimal import Decimal
from typing import Any

from celery import shared_task
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import send_mail
from django.db.models import Avg, Count, Sum
from django.template import engines
from django.utils import timezone

from reports.models import Report, Sale
from reports.recording import RecordedTask

__all__ = [
    "DEFAULT_REPORT_ROWS",
    "DEFAULT_REPORT_WORK",
    "MAX_LATENCY_MS",
    "NOTIFICATION_LATENCY_MS",
    "PermanentHTTPError",
    "bootstrap_interval",
    "fetch_slow",
    "generate_report",
    "send_notification",
]

# Default work size of one report: about a second of CPU on one core of the development machine.
DEFAULT_REPORT_ROWS = 5000
DEFAULT_REPORT_WORK = 800


MAX_LATENCY_MS = 5000


def _latency_ms(name: str) -> int:
    raw = os.environ.get(name, "").strip() or "0"
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_LATENCY_MS:
        raise ImproperlyConfigured(f"environment variable {name}={raw!r} must be an integer from 0 to 5000 (ms)")
    return value


# How long a notification waits before it is sent: stands for the mail provider's round trip (an SMTP or
# HTTP API call of a few hundred ms), which the file-based backend does not have. 0 (default) sends at
# once; load tests set it so that a burst of notifications holds a backlog as it would in production.
# Capped at 5 s, well under the task's soft time limit (10 s).
NOTIFICATION_LATENCY_MS = _latency_ms("NOTIFICATION_LATENCY_MS")



def _clamped_latency_ms(value: object) -> int:
    try:
        number = int(value)  # type: ignore[call-overload]  # any JSON value may arrive in a message
    except (TypeError, ValueError, OverflowError):
        return 0
    return min(max(number, 0), MAX_LATENCY_MS)


_REPORT_TEMPLATE = """<!doctype html>
<html><head><title>Sales report {{ report_id }}</title></head>
<body>
<h1>Sales report</h1>
<p>{{ rows }} rows, {{ groups|length }} groups, generated {{ generated_at }}</p>
<table>
<tr><th>Region</th><th>Product</th><th>Sales</th><th>Quantity</th><th>Total</th><th>Mean</th>
<th>95% CI of the mean</th></tr>
{% for g in groups %}<tr><td>{{ g.region }}</td><td>{{ g.product }}</td><td>{{ g.count }}</td>
<td>{{ g.quantity }}</td><td>{{ g.total }}</td><td>{{ g.mean|floatformat:2 }}</td>
<td>{{ g.ci_low|floatformat:2 }} - {{ g.ci_high|floatformat:2 }}</td></tr>
{% endfor %}</table>
</body></html>
"""


class PermanentHTTPError(Exception):
    """A 4xx answer: retrying would not help."""


@shared_task(
    base=RecordedTask,
    name="reports.tasks.send_notification",
    soft_time_limit=10,
    time_limit=20,
)
def send_notification(to: str, subject: str, body: str, latency_ms: int | None = None) -> dict[str, Any]:
    """Send one notification mail (file-based backend by default: one file per message).

    ``latency_ms`` stands for the mail provider's round trip for this one message (a demo or load test sets
    it, `loadgen --latency-ms`); None uses NOTIFICATION_LATENCY_MS. A message's value is clamped to the same
    0..5000 ms as the setting: a message must not hold a worker process past the task's soft limit.
    """
    delay_ms = NOTIFICATION_LATENCY_MS if latency_ms is None else _clamped_latency_ms(latency_ms)
    if delay_ms:
        time.sleep(delay_ms / 1000.0)
    sent = send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, [to], fail_silently=False)
    return {"sent": sent, "to": to}


def bootstrap_interval(
    values: list[float], rounds: int, rng: random.Random, *, level: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean: ``rounds`` resamples of ``values``."""
    if not values:
        return (0.0, 0.0)
    if rounds <= 0:
        mean = statistics.fmean(values)
        return (mean, mean)
    size = len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=size)) for _ in range(rounds))
    tail = (1.0 - level) / 2.0
    low = means[min(rounds - 1, int(tail * rounds))]
    high = means[min(rounds - 1, int((1.0 - tail) * rounds))]
    return (low, high)


class ReportTask(RecordedTask):  # type: ignore[misc]
    abstract = True

    def poisoned(self, report_id: str, *_args: Any, error: str, **_kwargs: Any) -> None:
        Report.objects.filter(pk=report_id).update(status=Report.Status.FAILED, error=error[:2000],
                                                   finished_at=timezone.now())


@shared_task(
    base=ReportTask,
    name="reports.tasks.generate_report",
    ignore_result=False,  # the one task whose result is kept (GET /reports/<id>/ shows its state)
    soft_time_limit=30,
    time_limit=45,
)
def generate_report(report_id: str) -> dict[str, Any]:
    """Aggregate the first ``rows`` Sale rows by region and product and render the report."""
    report = Report.objects.get(pk=report_id)
    Report.objects.filter(pk=report.pk).update(status=Report.Status.RUNNING)
    try:
        result, html = _render_report(report)
    except BaseException as exc:
        Report.objects.filter(pk=report.pk).update(
            status=Report.Status.FAILED, error=f"{type(exc).__name__}: {exc}"[:2000], finished_at=timezone.now()
        )
        raise
    Report.objects.filter(pk=report.pk).update(
        status=Report.Status.DONE, result=result, html=html, error="", finished_at=timezone.now()
    )
    return result


def _render_report(report: Report) -> tuple[dict[str, Any], str]:
    subset = Sale.objects.filter(pk__in=Sale.objects.order_by("pk").values("pk")[: report.rows])
    # The aggregation runs in PostgreSQL...
    groups = list(
        subset.values("region", "product")
        .annotate(count=Count("pk"), quantity=Sum("quantity"), total=Sum("amount"), mean=Avg("amount"))
        .order_by("region", "product")
    )
    # ...the resampling and the rendering in Python: the CPU-bound part.
    amounts: dict[tuple[str, str], list[float]] = {}
    for region, product, amount in subset.values_list("region", "product", "amount"):
        amounts.setdefault((region, product), []).append(float(amount))
    rng = random.Random(str(report.pk))  # noqa: S311 - statistics, not security
    for group in groups:
        low, high = bootstrap_interval(amounts[(group["region"], group["product"])], report.work, rng)
        group["ci_low"], group["ci_high"] = low, high
        group["total"] = str(group["total"])
        group["mean"] = float(group["mean"])
    html = (
        engines["django"]
        .from_string(_REPORT_TEMPLATE)
        .render(
            {
                "report_id": report.pk,
                "rows": sum(g["count"] for g in groups),
                "groups": groups,
                "generated_at": timezone.now().isoformat(),
            }
        )
    )
    total = sum((Decimal(g["total"]) for g in groups), Decimal(0))
    result = {
        "rows": sum(g["count"] for g in groups),
        "groups": len(groups),
        "total_amount": str(total),
        "work": report.work,
        "html_bytes": len(html),
        "html_sha256": hashlib.sha256(html.encode()).hexdigest(),
    }
    return result, html


@shared_task(
    base=RecordedTask,
    name="reports.tasks.fetch_slow",
    autoretry_for=(OSError,),  # connection refused/reset, timeouts, 5xx (urllib's errors are OSErrors)
    dont_autoretry_for=(PermanentHTTPError,),
    retry_backoff=2,
    retry_backoff_max=settings.MAX_COUNTDOWN_S,
    retry_jitter=True,
    max_retries=3,
    soft_time_limit=20,
    time_limit=30,
)
def fetch_slow(ms: int, timeout_s: float = 5.0) -> dict[str, Any]:
    """GET the web service's ``/slow?ms=N`` with a timeout (I/O-bound: the worker mostly waits)."""
    url = f"{settings.SLOW_ENDPOINT_URL}?{urllib.parse.urlencode({'ms': int(ms)})}"
    if not url.startswith(("http://", "https://")):
        raise PermanentHTTPError(f"SLOW_ENDPOINT_URL must be http(s): {url}")
    begin = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - scheme checked
            response.read()
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        if exc.code < 500:
            raise PermanentHTTPError(f"GET {url}: {exc.code}") from exc
        raise
    return {"status": status, "elapsed_ms": round((time.perf_counter() - begin) * 1000.0, 1)}
