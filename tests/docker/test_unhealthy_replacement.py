"""A replica that stays unhealthy is replaced (issue 11, 4): plain Docker never restarts an unhealthy
container, and the workers' liveness healthcheck only reported. The autoscaler owns the pool's replicas: it
drains the unhealthy one like a scale-down victim and the count is restored with a fresh clone."""

from __future__ import annotations

import time
from typing import Any

import pytest
from dockertest import make_pool, wait_until

from autoscaler.backends.compose import ComposeBackend
from autoscaler.backends.docker_client import DockerConnection
from tests.docker.conftest import ProjectFactory

pytestmark = pytest.mark.docker


def test_an_unhealthy_replica_is_replaced_and_a_shared_cause_is_left_alone(compose_project: ProjectFactory) -> None:
    project = compose_project("unhealthy.yaml", "worker", tag="sick")
    failures: list[tuple[str, str]] = []
    backend = ComposeBackend(docker_connection=DockerConnection(), unhealthy_grace=1.0,
                             on_replica_failure=lambda pool, reason: failures.append((pool, reason)))
    pool = make_pool("fast", service="worker", project=project.name, stop_timeout="5s")
    try:
        def healthy(count: int) -> list[Any] | None:
            found = [c for c in project.containers("worker", all_states=False)
                     if c.attrs["State"].get("Health", {}).get("Status") == "healthy"]
            return found if len(found) == count else None

        sick = wait_until(lambda: healthy(3), timeout=60, what="three healthy replicas")[0]
        sick.exec_run(["rm", "/tmp/ok"])
        def replaced() -> bool:
            backend.status(pool)  # what each tick does first: notes which replicas are unhealthy since when
            return backend.replace_unhealthy(pool) == 1

        wait_until(replaced, timeout=60, what="the unhealthy replica to be drained")
        assert backend.status(pool).running == 2
        assert failures == [("fast", "unhealthy")]
        backend.scale(pool, current=2, desired=3)  # what the loop's repair does at the next tick
        wait_until(lambda: sick.id not in {c.id for c in project.containers("worker")}, timeout=60,
                   what="the unhealthy replica to be removed")
        wait_until(lambda: healthy(3), timeout=60, what="three healthy replicas again")

        # Two of three unhealthy: a shared cause, not replaced.
        for container in healthy(3)[:2]:  # type: ignore[index]
            container.exec_run(["rm", "/tmp/ok"])
        wait_until(lambda: len([c for c in project.containers("worker", all_states=False)
                                if c.attrs["State"].get("Health", {}).get("Status") == "unhealthy"]) == 2,
                   timeout=30, what="two unhealthy replicas")
        for _ in range(3):
            assert backend.status(pool).running == 3
            assert backend.replace_unhealthy(pool) == 0
            time.sleep(0.8)  # past the 1 s grace: overdue, and still left alone
        assert failures == [("fast", "unhealthy")]
    finally:
        backend.close()
