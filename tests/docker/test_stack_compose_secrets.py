"""The Compose CLI itself refuses the stack without secrets, and the dev mode is explicit (issue 11, 1)."""

from __future__ import annotations

import os
import subprocess

import pytest
from dockertest import REPO, compose_command

pytestmark = pytest.mark.docker


def config(*files: str, env: dict[str, str], env_file: str | None = None) -> subprocess.CompletedProcess[str]:
    unset = ("DJANGO_SECRET_KEY", "DB_PASSWORD", "DB_ADMIN_PASSWORD", "DOCKER_GID")
    base = {k: v for k, v in os.environ.items() if k not in unset}
    args = [*compose_command(), *(["--env-file", env_file] if env_file else []), "-p", "secrets"]
    for file in files:
        args += ["-f", file]
    return subprocess.run([*args, "config"], cwd=REPO, env={**base, **env}, capture_output=True, text=True,
                          timeout=60, check=False)


def test_no_secret_no_stack() -> None:
    proc = config("stack/compose.yaml", env={})
    assert proc.returncode != 0
    assert "set DJANGO_SECRET_KEY" in proc.stderr or "set DB_" in proc.stderr, proc.stderr


def test_the_dev_mode_is_an_explicit_env_file() -> None:
    proc = config("stack/compose.yaml", env={}, env_file="stack/dev.env")
    assert proc.returncode == 0, proc.stderr
    assert "STACK_DEV_MODE: '1'" in proc.stdout or 'STACK_DEV_MODE: "1"' in proc.stdout


def test_the_autoscaler_is_not_given_the_root_group_by_default() -> None:
    secrets = {"DJANGO_SECRET_KEY": "k" * 50, "DB_PASSWORD": "p" * 24, "DB_ADMIN_PASSWORD": "a" * 24}
    proc = config("stack/compose.yaml", "deploy/compose.yaml", env=secrets)
    assert proc.returncode != 0 and "set DOCKER_GID" in proc.stderr, proc.stderr
