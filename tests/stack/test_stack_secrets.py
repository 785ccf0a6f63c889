"""The stack refuses published secrets outside the explicit development mode (issue 11, 1 and 9).

Each case starts the stack's settings in a process of its own, with exactly the environment given: the
settings are read once per process, and the test session's own stack settings must not leak in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("django", reason="the stack's requirements (requirements/stack.lock) are not installed")

STACK_DIR = Path(__file__).resolve().parents[2] / "stack"
GOOD = {"DJANGO_SECRET_KEY": "k" * 50, "DB_PASSWORD": "p" * 24, "REDIS_PASSWORD": "r" * 32}
SHOW = (
    "import json, django; django.setup(); from django.conf import settings as s; d = s.DATABASES['default']; "
    "print(json.dumps([d['USER'], d['PASSWORD'], d['HOST'], d['PORT'], d['NAME']]))"
)


# The brokers' URLs as the clients parse them: redis-py (the publish guard) and kombu (Celery).
SHOW_REDIS = (
    "import json, django, redis; from kombu.utils.url import url_to_parts; django.setup(); "
    "from django.conf import settings as s; url = s.CELERY_BROKER_URL; "
    "results = s.CELERY_RESULT_BACKEND.partition('+')[2]; "
    "print(json.dumps([redis.connection.parse_url(url)['password'], url_to_parts(url).password, "
    "redis.connection.parse_url(results)['password'], redis.connection.parse_url(url)['host']]))"
)
# What Celery itself connects to: it reads CELERY_BROKER_URL from the environment ahead of the settings.
SHOW_CELERY = (
    "import json, django; django.setup(); from core.celery import app; "
    "print(json.dumps(app.connection_for_write().as_uri(include_password=True)))"
)


def start(env: dict[str, str], show: str = SHOW) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("DJANGO_", "DB_", "DATABASE_", "STACK_", "REDIS_", "CELERY_", "RESULT_"))}
    return subprocess.run([sys.executable, "-c", show], cwd=STACK_DIR, capture_output=True, text=True, timeout=60,
                          env={**base, "DJANGO_SETTINGS_MODULE": "core.settings", **env}, check=False)


def test_random_secrets_start() -> None:
    proc = start(GOOD)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["app", "p" * 24, "db", "5432", "stack"]


@pytest.mark.parametrize(("name", "value"), [
    ("DJANGO_SECRET_KEY", "dev-only-insecure-secret-key-change-me"),
    ("DJANGO_SECRET_KEY", "django-insecure-" + "x" * 40),
    ("DJANGO_SECRET_KEY", "short"),
    ("DB_PASSWORD", "postgres"),
    ("DB_PASSWORD", "short"),
    ("REDIS_PASSWORD", "dev-only-insecure-redis-password"),
    ("REDIS_PASSWORD", "r" * 15),
])
def test_a_published_or_short_secret_is_refused_outside_dev_mode(name: str, value: str) -> None:
    proc = start({**GOOD, name: value})
    assert proc.returncode != 0 and f"{name} is a development value" in proc.stderr
    assert start({**GOOD, name: value, "STACK_DEV_MODE": "1"}).returncode == 0


def test_secrets_come_from_files_too(tmp_path: Path) -> None:
    key, password = tmp_path / "key", tmp_path / "password"
    key.write_text("s" * 50 + "\n")
    password.write_text("a/b@c%41:d" * 3 + "\n")  # needs no URL quoting any more
    proc = start({"DJANGO_SECRET_KEY_FILE": str(key), "DB_PASSWORD_FILE": str(password), "REDIS_PASSWORD": "r" * 32})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[1] == "a/b@c%41:d" * 3
    both = start({"DJANGO_SECRET_KEY_FILE": str(key), "DJANGO_SECRET_KEY": "k" * 50, "DB_PASSWORD": "p" * 24})
    assert "set DJANGO_SECRET_KEY or DJANGO_SECRET_KEY_FILE, not both" in both.stderr
    missing = start({"DJANGO_SECRET_KEY_FILE": str(tmp_path / "nope"), "DB_PASSWORD": "p" * 24})
    assert "cannot be read" in missing.stderr


@settings(max_examples=25, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), min_size=12, max_size=40))
def test_any_password_reaches_the_driver_unchanged(password: str) -> None:
    proc = start({**GOOD, "DB_PASSWORD": password})
    if password.strip() != password or password in ("postgres", "password"):
        return  # environment values are passed as they are; the file form strips a trailing newline only
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[1] == password


def test_the_brokers_need_a_password_outside_dev_mode() -> None:
    """Issue 18, 3: the broker had none; anything local could FLUSHALL it or undo its noeviction."""
    no_password = {k: v for k, v in GOOD.items() if k != "REDIS_PASSWORD"}
    proc = start(no_password)
    assert proc.returncode != 0 and "CELERY_BROKER_URL: the stack's Redis needs a password" in proc.stderr, proc.stderr
    assert start({**no_password, "STACK_DEV_MODE": "1"}).returncode == 0
    # A password in the URL itself is held to the same rule, and is not given twice.
    weak = start({**no_password, "CELERY_BROKER_URL": "redis://:short@redis:6379/0"})
    assert weak.returncode != 0 and "CELERY_BROKER_URL's password is a development value" in weak.stderr, weak.stderr
    both = start({**GOOD, "RESULT_BACKEND_URL": "redis://:" + "x" * 20 + "@redis-results:6379/0"})
    assert both.returncode != 0 and "RESULT_BACKEND_URL has a password and REDIS_PASSWORD is set too" in both.stderr


def test_the_redis_password_comes_from_a_file_too(tmp_path: Path) -> None:
    password = tmp_path / "redis"
    password.write_text("f/@%41:" * 4 + "\n")
    proc = start({**GOOD, "REDIS_PASSWORD": "", "REDIS_PASSWORD_FILE": str(password)}, show=SHOW_REDIS)
    assert "not both" in proc.stderr, proc.stderr  # REDIS_PASSWORD set (even empty) and the file: ambiguous
    env = {k: v for k, v in GOOD.items() if k != "REDIS_PASSWORD"} | {"REDIS_PASSWORD_FILE": str(password)}
    proc = start(env, show=SHOW_REDIS)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["f/@%41:" * 4] * 3 + ["redis"]


@settings(max_examples=25, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), min_size=16, max_size=40))
def test_any_redis_password_reaches_both_clients_unchanged(password: str) -> None:
    """URL-quoted into the broker's and the result store's URLs: redis-py and kombu read it back as it was."""
    proc = start({**GOOD, "REDIS_PASSWORD": password}, show=SHOW_REDIS)
    if password.strip() != password:
        return  # environment values are passed as they are; the file form strips a trailing newline only
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [password, password, password, "redis"]


def test_celery_connects_with_the_password_the_compose_files_variable_names_no_password() -> None:
    """stack/compose.yaml sets CELERY_BROKER_URL without the password, and Celery prefers that variable to the
    setting: the workers connected without it (found by the e2e stack test)."""
    password = "a/b@c%41:d" * 2
    proc = start({**GOOD, "REDIS_PASSWORD": password, "CELERY_BROKER_URL": "redis://redis:6379/0"}, show=SHOW_CELERY)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == "redis://:a%2Fb%40c%2541%3Ada%2Fb%40c%2541%3Ad@redis:6379/0"
