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
GOOD = {"DJANGO_SECRET_KEY": "k" * 50, "DB_PASSWORD": "p" * 24}
SHOW = (
    "import json, django; django.setup(); from django.conf import settings as s; d = s.DATABASES['default']; "
    "print(json.dumps([d['USER'], d['PASSWORD'], d['HOST'], d['PORT'], d['NAME']]))"
)


def start(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DB_", "DATABASE_", "STACK_"))}
    base.pop("CELERY_RESULT_BACKEND", None)
    return subprocess.run([sys.executable, "-c", SHOW], cwd=STACK_DIR, capture_output=True, text=True, timeout=60,
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
])
def test_a_published_or_short_secret_is_refused_outside_dev_mode(name: str, value: str) -> None:
    proc = start({**GOOD, name: value})
    assert proc.returncode != 0 and f"{name} is a development value" in proc.stderr
    assert start({**GOOD, name: value, "STACK_DEV_MODE": "1"}).returncode == 0


def test_secrets_come_from_files_too(tmp_path: Path) -> None:
    key, password = tmp_path / "key", tmp_path / "password"
    key.write_text("s" * 50 + "\n")
    password.write_text("a/b@c%41:d" * 3 + "\n")  # needs no URL quoting any more
    proc = start({"DJANGO_SECRET_KEY_FILE": str(key), "DB_PASSWORD_FILE": str(password)})
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
