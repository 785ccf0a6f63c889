"""System check: every task of this app has a queue route (else it would wait in a queue nobody reads)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, register


@register()
def check_task_routes(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Error for each ``reports.*`` task without an entry in CELERY_TASK_ROUTES, or routed nowhere known."""
    from core.celery import app  # noqa: PLC0415 - core.celery imports this app's modules
    from reports import tasks  # noqa: F401, PLC0415 - registers the tasks; needs the app registry

    errors: list[CheckMessage] = []
    routes: dict[str, dict[str, str]] = settings.CELERY_TASK_ROUTES
    for name in sorted(app.tasks):
        if not name.startswith("reports."):
            continue
        route = routes.get(name)
        if route is None:
            errors.append(Error(f"task {name} has no route in CELERY_TASK_ROUTES", id="reports.E001"))
        elif route.get("queue") not in settings.QUEUES:
            errors.append(
                Error(f"task {name} is routed to {route.get('queue')!r}, not a served queue", id="reports.E002")
            )
    return errors
