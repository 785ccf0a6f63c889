"""``migrate`` behind a PostgreSQL advisory lock, after waiting for the database to accept connections.

The compose file runs it once, in the one-shot ``migrate`` service that web and workers wait for. The lock
makes it safe anyway when two copies start together (a scaled service, a manual run during a deploy):
the second waits for the first and then finds nothing to apply.
"""

from __future__ import annotations

import time
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import OperationalError, connection

# Any constant shared by every copy of this command; "stack" in ASCII.
MIGRATION_LOCK_ID = 0x737461636B


class Command(BaseCommand):
    help = "Wait for the database, take an advisory lock, run migrate."
    requires_system_checks: list[str] = []  # noqa: RUF012 - Django's own attribute

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the database")

    def handle(self, *args: Any, **options: Any) -> None:
        deadline = time.monotonic() + options["wait"]
        while True:
            try:
                connection.ensure_connection()
                break
            except OperationalError as exc:
                if time.monotonic() > deadline:
                    raise CommandError(f"database unavailable: {exc}") from exc
                self.stderr.write(f"waiting for the database: {exc}".strip())
                time.sleep(1.0)
        if connection.vendor != "postgresql":
            call_command("migrate", interactive=False, verbosity=options["verbosity"])
            return
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK_ID])
        try:
            call_command("migrate", interactive=False, verbosity=options["verbosity"])
        finally:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [MIGRATION_LOCK_ID])
