"""Start-up guards shared by the web process, the workers and the management commands."""

from __future__ import annotations

import os

from django.core.exceptions import ImproperlyConfigured

__all__ = ["TESTING_ENV", "refuse_eager_outside_tests"]

TESTING_ENV = "DJANGO_TESTING"


def refuse_eager_outside_tests(*, always_eager: bool, testing: bool | None = None) -> None:
    """Refuse to start when Celery would run tasks inline, unless the test suite asked for it.

    Eager mode executes every ``delay()`` inside the caller: a web request then blocks for the whole task
    and nothing ever reaches the queues, which is silent in production (the seed's "Synchronous Task
    Execution"). Only DJANGO_TESTING=1 allows it.
    """
    if testing is None:
        testing = os.environ.get(TESTING_ENV, "").strip().lower() in {"1", "true", "yes", "on"}
    if always_eager and not testing:
        raise ImproperlyConfigured(
            "CELERY_TASK_ALWAYS_EAGER is on: tasks would run inside the web process instead of the "
            f"workers. It is allowed only in the test suite ({TESTING_ENV}=1)."
        )
