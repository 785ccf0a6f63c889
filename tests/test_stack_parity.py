"""The Compose stack and the Swarm stack agree on what must agree (issue 11, 3).

`stack/compose.yaml` (one host) and `deploy/swarm-stack.yaml` (many) describe the same services twice, in
the keys each tool honours. What a Celery worker does, how it is checked, how long it may take to stop and
how much memory it gets must not depend on where it runs: the Swarm file once ran worker-io without its
threads pool, with no healthchecks and two webs that overran max_connections.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = YAML(typ="safe").load((ROOT / "stack" / "compose.yaml").read_text())
SWARM = YAML(typ="safe").load((ROOT / "deploy" / "swarm-stack.yaml").read_text())
APP_SERVICES = ["web", "worker-fast", "worker-cpu", "worker-io", "migrate"]
WORKERS = ["worker-fast", "worker-cpu", "worker-io"]
# Set in one file only, on purpose: Compose-only build and host-port details.
COMPOSE_ONLY_ENV: set[str] = set()


def words(command: Any) -> list[str]:
    return command.split() if isinstance(command, str) else list(command)


def megabytes(size: Any) -> int:
    number, unit = re.fullmatch(r"(\d+)([kmg])b?", str(size).lower()).groups()  # type: ignore[union-attr]
    return int(number) * {"k": 1, "m": 1024, "g": 1024 * 1024}[unit] // 1024


def limits(service: dict[str, Any], *, swarm: bool) -> tuple[int | None, int | None]:
    if swarm:
        resources = (service.get("deploy") or {}).get("resources") or {}
        limit = (resources.get("limits") or {}).get("memory")
        reservation = (resources.get("reservations") or {}).get("memory")
    else:
        limit, reservation = service.get("mem_limit"), service.get("mem_reservation")
    return (megabytes(limit) if limit else None, megabytes(reservation) if reservation else None)


@pytest.mark.parametrize("name", APP_SERVICES)
def test_the_same_command_and_environment(name: str) -> None:
    compose, swarm = COMPOSE["services"][name], SWARM["services"][name]
    assert words(compose["command"]) == words(swarm["command"])
    assert set(compose["environment"]) - COMPOSE_ONLY_ENV == set(swarm["environment"])
    for key in ("DB_APPLICATION_NAME", "DB_HOST", "DB_USER", "DB_NAME", "CELERY_BROKER_URL", "RESULT_BACKEND_URL"):
        assert compose["environment"].get(key) == swarm["environment"].get(key), key


@pytest.mark.parametrize("name", ["db", "redis", "redis-results"])
def test_the_same_memory_for_the_database_and_the_broker(name: str) -> None:
    assert limits(COMPOSE["services"][name], swarm=False)[0] == limits(SWARM["services"][name], swarm=True)[0]


@pytest.mark.parametrize("name", [*WORKERS, "web"])
def test_the_same_healthcheck_grace_and_memory(name: str) -> None:
    compose, swarm = COMPOSE["services"][name], SWARM["services"][name]
    assert compose["healthcheck"] == swarm["healthcheck"]
    assert compose["stop_grace_period"] == swarm["stop_grace_period"]
    assert limits(compose, swarm=False) == limits(swarm, swarm=True)


@pytest.mark.parametrize("name", WORKERS)
def test_the_same_pool_label_and_starting_count(name: str) -> None:
    compose, swarm = COMPOSE["services"][name], SWARM["services"][name]
    assert compose["labels"]["autoscaler.pool"] == swarm["deploy"]["labels"]["autoscaler.pool"]
    assert compose["scale"] == swarm["deploy"]["replicas"]


def test_one_web_so_that_the_connection_arithmetic_holds() -> None:
    assert SWARM["services"]["web"]["deploy"]["replicas"] == 1  # compose.yaml has one web
    assert "scale" not in COMPOSE["services"]["web"]


@pytest.mark.parametrize("name", ["db", "redis", "redis-results"])
def test_the_same_database_and_broker_settings(name: str) -> None:
    assert words(COMPOSE["services"][name]["command"]) == words(SWARM["services"][name]["command"])
    assert COMPOSE["services"][name]["healthcheck"] == SWARM["services"][name]["healthcheck"]
    if name != "db":  # the Redis servers' password on standard input, checked alike (issue 18, 3)
        assert COMPOSE["services"][name]["entrypoint"] == SWARM["services"][name]["entrypoint"]
        assert set(COMPOSE["services"][name]["environment"]) == set(SWARM["services"][name]["environment"])
        assert COMPOSE["services"][name]["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
        assert SWARM["services"][name]["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")


def test_db_setup_is_the_same_one_shot() -> None:
    compose, swarm = COMPOSE["services"]["db-setup"], SWARM["services"]["db-setup"]
    assert compose["entrypoint"] == swarm["entrypoint"]
    assert compose["environment"] == swarm["environment"]


def test_no_default_secret_in_either_file() -> None:
    for path in ("stack/compose.yaml", "deploy/swarm-stack.yaml", "deploy/compose.yaml"):
        text = (ROOT / path).read_text()
        for name in ("DJANGO_SECRET_KEY", "DB_PASSWORD", "DB_ADMIN_PASSWORD", "REDIS_PASSWORD", "STATE_REDIS_PASSWORD"):
            for match in re.finditer(r"\$\{" + name + r"(:?[-?])?", text):
                assert match.group(1) == ":?", f"${{{name}...}} must be required (:?), not defaulted"


def test_results_are_kept_out_of_the_broker() -> None:
    """The broker's maxmemory is for queues: results go to a Redis of their own, in both files."""
    for document in (COMPOSE, SWARM):
        url = document["x-app-environment"]["RESULT_BACKEND_URL"] if "x-app-environment" in document else None
        urls = {service.get("environment", {}).get("RESULT_BACKEND_URL") for service in document["services"].values()
                if isinstance(service.get("environment"), dict)} | {url}
        urls.discard(None)
        assert urls == {"redis://redis-results:6379/0"}, urls
        assert "allkeys-lru" in words(document["services"]["redis-results"]["command"])
        assert "noeviction" in words(document["services"]["redis"]["command"])
