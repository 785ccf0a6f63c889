"""The Compose CLI itself refuses the stack without secrets, and the dev mode is explicit (issue 11, 1); the
stack's broker refuses a client without its password (issue 18, 3)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator

import docker
import pytest
import redis
from dockertest import REPO, compose_command, unique_name, wait_until

pytestmark = pytest.mark.docker
SECRETS = {"DJANGO_SECRET_KEY": "k" * 50, "DB_PASSWORD": "p" * 24, "DB_ADMIN_PASSWORD": "a" * 24,
           "REDIS_PASSWORD": "r" * 32}


def config(*files: str, env: dict[str, str], env_file: str | None = None) -> subprocess.CompletedProcess[str]:
    unset = ("DJANGO_SECRET_KEY", "DB_PASSWORD", "DB_ADMIN_PASSWORD", "DOCKER_GID", "REDIS_PASSWORD",
             "STATE_REDIS_PASSWORD")
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
    proc = config("stack/compose.yaml", "deploy/compose.yaml", env={**SECRETS, "STATE_REDIS_PASSWORD": "s" * 32})
    assert proc.returncode != 0 and "set DOCKER_GID" in proc.stderr, proc.stderr


@pytest.mark.parametrize(("files", "missing"), [
    (["stack/compose.yaml"], "REDIS_PASSWORD"),
    (["stack/compose.yaml", "deploy/compose.yaml"], "STATE_REDIS_PASSWORD"),
])
def test_no_redis_password_no_stack(files: list[str], missing: str) -> None:
    env = {**SECRETS, "STATE_REDIS_PASSWORD": "s" * 32, "DOCKER_GID": "999"}
    del env[missing]
    proc = config(*files, env=env)
    assert proc.returncode != 0 and f"set {missing}" in proc.stderr, proc.stderr


@pytest.fixture
def broker() -> Iterator[tuple[str, int, str]]:
    """The stack's `redis` service alone, as stack/compose.yaml runs it: (container id, host port, password)."""
    password = secrets.token_hex(16)
    project = unique_name("broker")
    env = {**os.environ, **SECRETS, "REDIS_PASSWORD": password}
    env.pop("REDIS_PORT", None)  # an ephemeral host port
    compose = [*compose_command(), "-p", project, "-f", "stack/compose.yaml"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*compose, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                              check=True)

    try:
        run("up", "-d", "--no-deps", "redis")
        container = run("ps", "-q", "redis").stdout.strip()
        port = int(run("port", "redis", "6379").stdout.strip().rpartition(":")[2])
        yield container, port, password
    finally:
        subprocess.run([*compose, "down", "-v", "--remove-orphans"], cwd=REPO, env=env, capture_output=True,
                       timeout=120, check=False)


def test_the_broker_refuses_a_client_without_its_password(broker: tuple[str, int, str]) -> None:
    """Issue 18, 3: any local process could CONFIG SET, FLUSHALL or inject tasks through the published port."""
    container, port, password = broker
    client = docker.from_env()
    # Healthy: the healthcheck's redis-cli authenticated (REDISCLI_AUTH) and got PONG, not a NOAUTH error.
    wait_until(lambda: client.api.inspect_container(container)["State"].get("Health", {}).get("Status") == "healthy"
               or None, timeout=90, what="the broker to be healthy")
    anonymous = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    for command in (("PING",), ("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"), ("FLUSHALL",),
                    ("LPUSH", "fast", "injected")):
        with pytest.raises(redis.AuthenticationError):
            anonymous.execute_command(*command)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port, password="wrong", socket_timeout=5).ping()
    client_ok = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=5)
    assert client_ok.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    # Not on a command line: neither the container's (docker inspect) nor the process's (ps on the host).
    spec = client.api.inspect_container(container)
    assert password not in json.dumps([spec["Path"], spec["Args"], spec["Config"]["Cmd"]])
    top = client.api.top(container, ps_args="-eo pid,args")
    assert password not in json.dumps(top["Processes"]), top
