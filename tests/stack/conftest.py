"""Set up the stack's Django project (stack/) for its unit tests: SQLite in memory, eager Celery.

The tests skip when Django is not installed (``pip install --require-hashes -r requirements/stack.lock`` enables them).
STACK_TEST_DATABASE_URL runs them against a real PostgreSQL instead (a test database is created).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

STACK_DIR = Path(__file__).resolve().parents[2] / "stack"

try:
    import django
except ImportError:  # the stack's requirements are not installed: the test modules skip themselves
    django = None

# Read once, by the settings module in django.setup(); restored afterwards so that the rest of the
# repository's test session does not see them.
_STACK_TEST_ENV = {
    "DJANGO_SETTINGS_MODULE": "core.settings",
    "DJANGO_SECRET_KEY": "test-secret-key",
    "DJANGO_TESTING": "1",
    "CELERY_TASK_ALWAYS_EAGER": "1",
    "CELERY_BROKER_URL": "memory://",
    "RESULT_BACKEND_URL": "cache+memory://",
    "DATABASE_URL": os.environ.get("STACK_TEST_DATABASE_URL", "sqlite:///:memory:"),
    "EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend",
    # Nothing listens on port 9 (discard) of the loopback: fetch_slow's calls are refused.
    "SLOW_ENDPOINT_URL": "http://127.0.0.1:9/slow",
}

if django is not None:
    if str(STACK_DIR) not in sys.path:
        sys.path.insert(0, str(STACK_DIR))
    # CELERY_RESULT_BACKEND is refused by the settings (Celery would read it): unset during the setup.
    _saved = {name: os.environ.get(name) for name in [*_STACK_TEST_ENV, "CELERY_RESULT_BACKEND"]}
    os.environ.pop("CELERY_RESULT_BACKEND", None)
    os.environ.update(_STACK_TEST_ENV)
    try:
        django.setup()
    finally:
        for name, value in _saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def django_test_db() -> Iterator[None]:
    """Create the test database once (migrations included) and drop it at the end."""
    from django.db import connection  # noqa: PLC0415 - only after django.setup()
    from django.test.utils import setup_test_environment, teardown_test_environment  # noqa: PLC0415 - only after django.setup()

    setup_test_environment()
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    yield
    connection.creation.destroy_test_db(old_name, verbosity=0)
    teardown_test_environment()


@pytest.fixture
def db(django_test_db: None) -> Iterator[None]:
    """Each test runs in a transaction that is rolled back afterwards."""
    from core.celery import app  # noqa: PLC0415 - only after django.setup()
    from django.core import mail  # noqa: PLC0415 - only after django.setup()
    from django.db import transaction  # noqa: PLC0415 - only after django.setup()

    # Other test modules create Celery apps of their own, and the newest becomes "current"; the stack's
    # shared_task proxies must resolve to the stack's app (its routes, its eager mode), whatever ran before.
    app.set_current()
    app.set_default()
    mail.outbox = []
    with transaction.atomic():
        yield
        transaction.set_rollback(True)
