"""App config: start-up guards run in every process that loads Django."""

from __future__ import annotations

from django.apps import AppConfig
from django.conf import settings

from core.startup import refuse_eager_outside_tests


class ReportsConfig(AppConfig):
    """Runs the eager-mode guard and registers the routing check."""

    name = "reports"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from reports import checks  # noqa: F401, PLC0415 - registers the system checks once apps are ready

        refuse_eager_outside_tests(always_eager=settings.CELERY_TASK_ALWAYS_EAGER)
