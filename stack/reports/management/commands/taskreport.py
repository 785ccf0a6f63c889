"""Compare enqueued and completed task ids; exit 1 if any enqueued task has not succeeded.

    python manage.py taskreport [--run LABEL] [--queue NAME] [--wait SECONDS] [--json] [--limit N]
        [--fail-on-redelivery]

Redeliveries (TaskRun rows with attempts > 1) are listed, and fail the command only with
--fail-on-redelivery: with acks_late a redelivery is expected after a worker dies, and each id still has
exactly one row.
"""

from __future__ import annotations

import json
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from reports.accounting import Accounting, account


class Command(BaseCommand):
    help = "Enqueued vs completed tasks per queue; exit 1 if anything is missing."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--run", default=None, help="one loadgen run label ('api' = POST /reports/)")
        parser.add_argument("--queue", default=None, choices=settings.QUEUES)
        parser.add_argument("--wait", type=float, default=0.0, help="poll up to SECONDS until nothing is missing")
        parser.add_argument("--interval", type=float, default=1.0, help="poll interval for --wait, seconds")
        parser.add_argument("--json", action="store_true", help="print one JSON document")
        parser.add_argument("--limit", type=int, default=20, help="ids listed per kind (0: all)")
        parser.add_argument("--fail-on-redelivery", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        deadline = time.monotonic() + options["wait"]
        while True:
            result = account(run=options["run"], queue=options["queue"])
            if result.ok or time.monotonic() >= deadline:
                break
            time.sleep(options["interval"])
        limit = options["limit"] or None
        if options["json"]:
            self.stdout.write(json.dumps(result.as_dict(limit=limit), indent=2))
        else:
            self._print_table(result, limit)
        problems = []
        if result.missing_ids:
            problems.append(f"{len(result.missing_ids)} enqueued task(s) did not succeed")
        if options["fail_on_redelivery"] and result.redelivered_ids:
            problems.append(f"{len(result.redelivered_ids)} task(s) were redelivered")
        if problems:
            raise CommandError("; ".join(problems), returncode=1)

    def _print_table(self, result: Accounting, limit: int | None) -> None:
        data = result.as_dict(limit=limit)
        self.stdout.write(f"run: {result.run or '(all)'}")
        columns = (
            "enqueued",
            "succeeded",
            "failed",
            "in_progress",
            "not_started",
            "missing",
            "redelivered",
            "duplicates_skipped",
        )
        self.stdout.write(f"{'queue':<16}" + "".join(f"{name:>19}" for name in columns) + f"{'wait p50/p95 ms':>20}")
        for name, counts in [*data["queues"].items(), ("TOTAL", data["totals"])]:
            wait = "{p50}/{p95}".format(**counts["wait_ms"])
            self.stdout.write(f"{name:<16}" + "".join(f"{counts[column]:>19}" for column in columns) + f"{wait:>20}")
        for kind in ("missing_ids", "failed_ids", "redelivered_ids", "unexpected_ids"):
            ids = data[kind]
            if ids:
                self.stdout.write(f"{kind} ({len(getattr(result, kind))}): {' '.join(ids)}")
        self.stdout.write("OK: every enqueued task succeeded" if result.ok else "MISSING tasks (see above)")
