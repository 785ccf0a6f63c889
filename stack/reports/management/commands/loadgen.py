"""Enqueue real tasks on one queue, recording each id in EnqueuedTask BEFORE it is published.

    python manage.py loadgen --queue fast --count 1000 [--rate R | --ramp FROM:TO:SECONDS |
        --burst SIZE[:EVERY]] [--run LABEL] [--ids-file PATH] [--latency-ms 1000] [--ms 200]
        [--rows 5000 --work 60]

Prints one JSON line at the end (run label, counts, achieved rate, publish latency). Compare enqueued and
completed afterwards with ``python manage.py taskreport --run LABEL [--wait SECONDS]``.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from core.celery import app
from reports.accounting import percentiles
from reports.loadgen import Burst, Ramp, parse_burst, parse_ramp, send_offsets
from reports.models import EnqueuedTask, Report
from reports.publishing import publish_refusal
from reports.tasks import (
    DEFAULT_REPORT_ROWS,
    DEFAULT_REPORT_WORK,
    MAX_LATENCY_MS,
    fetch_slow,
    generate_report,
    send_notification,
)

QUEUE_ALIASES = {
    "fast": settings.QUEUE_FAST,
    "cpu": settings.QUEUE_CPU,
    "cpu_intensive": settings.QUEUE_CPU,
    "io": settings.QUEUE_IO,
    "io_intensive": settings.QUEUE_IO,
}
# Rows are written and messages published in batches of at most this many (when due at the same time).
BATCH = 500


class Command(BaseCommand):
    help = "Enqueue tasks on one queue (ids recorded in EnqueuedTask before publishing)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--queue", required=True, choices=sorted(QUEUE_ALIASES))
        parser.add_argument("--count", type=int, required=True)
        shape = parser.add_mutually_exclusive_group()
        shape.add_argument("--rate", type=float, help="constant rate, tasks per second")
        shape.add_argument("--ramp", type=str, help="FROM:TO:SECONDS, linear rate change")
        shape.add_argument("--burst", type=str, help="SIZE[:EVERY], SIZE tasks every EVERY seconds")
        parser.add_argument("--run", default=None, help="label for this run (default: lg-<time>-<random>)")
        parser.add_argument("--ids-file", type=Path, help="also append 'task_id<TAB>queue<TAB>run' lines here")
        parser.add_argument(
            "--latency-ms",
            type=int,
            default=None,
            help="fast: the mail provider's round trip each notification waits, 0..5000 ms (default: the "
            "workers' NOTIFICATION_LATENCY_MS)",
        )
        parser.add_argument("--ms", type=int, default=200, help="io: how long /slow takes, ms")
        parser.add_argument("--timeout", type=float, default=5.0, help="io: HTTP timeout, seconds")
        parser.add_argument("--rows", type=int, default=DEFAULT_REPORT_ROWS, help="cpu: rows to aggregate")
        parser.add_argument("--work", type=int, default=DEFAULT_REPORT_WORK, help="cpu: resampling rounds")

    def handle(self, *args: Any, **options: Any) -> None:
        queue = QUEUE_ALIASES[options["queue"]]
        count: int = options["count"]
        if count <= 0:
            raise CommandError("--count must be > 0")
        latency_ms = options["latency_ms"]
        if latency_ms is not None and not 0 <= latency_ms <= MAX_LATENCY_MS:
            raise CommandError(f"--latency-ms must be from 0 to {MAX_LATENCY_MS}")
        try:
            ramp: Ramp | None = parse_ramp(options["ramp"]) if options["ramp"] else None
            burst: Burst | None = parse_burst(options["burst"]) if options["burst"] else None
            offsets = send_offsets(count, rate=options["rate"], ramp=ramp, burst=burst)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        run = options["run"] or f"lg-{timezone.now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        if len(run) > 64:
            raise CommandError("--run must be at most 64 characters")

        publish_ms: list[float] = []
        begin = time.monotonic()
        next_index = 0
        with app.producer_or_acquire() as producer:
            while next_index < count:
                wait = begin + offsets[next_index] - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                now = time.monotonic() - begin
                end = next_index
                while end < count and end - next_index < BATCH and offsets[end] <= now:
                    end += 1
                end = max(end, next_index + 1)
                self._send_batch(
                    range(next_index, end),
                    queue=queue,
                    run=run,
                    options=options,
                    producer=producer,
                    publish_ms=publish_ms,
                )
                next_index = end
        elapsed = time.monotonic() - begin
        summary = {
            "run": run,
            "queue": queue,
            "count": count,
            "published": len(publish_ms),
            "elapsed_s": round(elapsed, 3),
            "rate_achieved": round(len(publish_ms) / elapsed, 1) if elapsed > 0 else None,
            "publish_ms": percentiles(publish_ms, digits=3),
        }
        self.stdout.write(json.dumps(summary))

    def _send_batch(
        self,
        indexes: range,
        *,
        queue: str,
        run: str,
        options: dict[str, Any],
        producer: Any,
        publish_ms: list[float],
    ) -> None:
        """Record the batch's ids (one INSERT), then publish each message."""
        self._wait_for_broker_headroom()
        ids = [str(uuid.uuid4()) for _ in indexes]
        task = _task_for(queue)
        if queue == settings.QUEUE_CPU:
            Report.objects.bulk_create(
                [Report(id=uuid.UUID(task_id), rows=options["rows"], work=options["work"], run=run) for task_id in ids]
            )
        EnqueuedTask.objects.bulk_create(
            [EnqueuedTask(task_id=task_id, task_name=task.name, queue=queue, run=run) for task_id in ids]
        )
        if options["ids_file"] is not None:
            with options["ids_file"].open("a", encoding="utf-8") as handle:
                handle.writelines(f"{task_id}\t{queue}\t{run}\n" for task_id in ids)
        for index, task_id in zip(indexes, ids, strict=True):
            task_args, task_kwargs = _arguments(queue, index, task_id, run, options)
            started = time.perf_counter()
            task.apply_async(args=task_args, kwargs=task_kwargs, task_id=task_id, producer=producer)
            publish_ms.append((time.perf_counter() - started) * 1000.0)


    def _wait_for_broker_headroom(self) -> None:
        """Hold the load, as the web would answer 503, while the broker is too full to publish safely."""
        said = False
        while (reason := publish_refusal()) is not None:
            if not said:
                self.stderr.write(f"loadgen: waiting: {reason}")
                said = True
            time.sleep(1.0)


def _task_for(queue: str) -> Any:
    return {
        settings.QUEUE_FAST: send_notification,
        settings.QUEUE_CPU: generate_report,
        settings.QUEUE_IO: fetch_slow,
    }[queue]


def _arguments(
    queue: str, index: int, task_id: str, run: str, options: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    if queue == settings.QUEUE_FAST:
        kwargs: dict[str, Any] = {
            "to": f"user{index}@example.invalid",
            "subject": f"[{run}] notification #{index}",
            "body": f"Load generator run {run}, task {task_id}.",
        }
        if options.get("latency_ms") is not None:
            kwargs["latency_ms"] = options["latency_ms"]
        return [], kwargs
    if queue == settings.QUEUE_CPU:
        return [task_id], {}
    return [], {"ms": options["ms"], "timeout_s": options["timeout"]}
