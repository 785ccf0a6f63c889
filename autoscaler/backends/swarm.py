"""The Swarm backend: scales a replicated Swarm service by updating its replica count.

Swarm does the placing, starting and stopping itself; this backend only reads the service's spec and
tasks and writes `Spec.Mode.Replicated.Replicas`. The update is optimistic (it carries the object version
it read), so a concurrent `docker service update` makes it fail with "update out of sequence"; the
backend then re-reads and tries again.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import docker
from loguru import logger

from autoscaler.backends.base import OWNER_LABEL, BackendError, TargetNotFoundError, TargetStatus
from autoscaler.backends.docker_client import (
    DockerConflictError,
    DockerConnection,
    DockerNotFoundError,
    untyped_api,
)
from autoscaler.policy.model import PoolPolicy

__all__ = ["UPDATE_ATTEMPTS", "SwarmBackend", "TaskCounts", "count_tasks", "replicas_only"]

# Version conflicts come from a concurrent update; a few fresh re-reads always get through one.
UPDATE_ATTEMPTS = 5
_OUT_OF_SEQUENCE = "update out of sequence"
# Task states before "running" (https://docs.docker.com/engine/swarm/how-swarm-mode-works/swarm-task-states/).
_STARTING_STATES = frozenset({"new", "pending", "assigned", "accepted", "ready", "preparing", "starting"})
_FAILED_STATES = frozenset({"failed", "rejected", "orphaned"})


@dataclass(frozen=True, slots=True)
class TaskCounts:
    """A service's tasks by what they are doing now."""

    running: int = 0
    starting: int = 0
    stopping: int = 0
    failed: int = 0


def count_tasks(tasks: list[dict[str, Any]]) -> TaskCounts:
    """Running / starting / stopping tasks and failed ones still in the task history."""
    counts: Counter[str] = Counter()
    for task in tasks:
        state = str((task.get("Status") or {}).get("State", ""))
        desired = str(task.get("DesiredState", ""))
        if state in _FAILED_STATES:
            counts["failed"] += 1
        elif desired == "running" and state == "running":
            counts["running"] += 1
        elif desired == "running" and state in _STARTING_STATES:
            counts["starting"] += 1
        elif desired != "running" and state in (_STARTING_STATES | {"running"}):
            counts["stopping"] += 1
    return TaskCounts(
        running=counts["running"],
        starting=counts["starting"],
        stopping=counts["stopping"],
        failed=counts["failed"],
    )


class SwarmBackend:
    """Backend for `target: {swarm: {service}}` pools; needs the daemon to be a Swarm manager."""

    def __init__(
        self, *, docker_connection: DockerConnection, update_attempts: int = UPDATE_ATTEMPTS
    ) -> None:
        self._docker = docker_connection
        self._update_attempts = update_attempts

    def check(self, pool: PoolPolicy) -> None:
        self._replicated_spec(pool)

    def status(self, pool: PoolPolicy) -> TargetStatus:
        """`running` is the replica spec Swarm converges to; not ready while its tasks differ from it."""
        info, wanted = self._replicated_spec(pool)
        name = self._name(pool)
        tasks = self._docker.call(
            f"list the tasks of swarm service {name}",
            lambda c: untyped_api(c).tasks(filters={"service": str(info["ID"])}),
        )
        counts = count_tasks(tasks)
        updating = str((info.get("UpdateStatus") or {}).get("State", "")) in ("updating", "rollback_started")
        ready = counts.running == wanted and not counts.starting and not counts.stopping and not updating
        detail = _detail(name, wanted, counts, updating=updating)
        return TargetStatus(running=wanted, ready=ready, detail=detail)

    def scale(self, pool: PoolPolicy, *, current: int, desired: int) -> None:
        name = self._name(pool)
        for attempt in range(1, self._update_attempts + 1):
            info, wanted = self._replicated_spec(pool)
            if attempt == 1 and wanted != current:
                logger.info("swarm service {}: spec says {}, the loop saw {}", name, wanted, current)
            if wanted == desired:
                return
            try:
                self._update_replicas(info, desired)
            except BackendError as exc:
                if not _is_version_conflict(exc) or attempt == self._update_attempts:
                    raise
                logger.info("swarm service {} changed while scaling (attempt {}); re-reading", name, attempt)
                continue
            logger.debug("swarm service {}: replicas {} -> {}", name, wanted, desired)
            return

    def drain_marks(self, pool: PoolPolicy) -> tuple[tuple[str, float], ...]:  # noqa: ARG002 - protocol
        # Swarm stops its own tasks (with the service's stop_grace_period); nothing to carry over.
        return ()

    def resume_drains(self, pool: PoolPolicy, marks: tuple[tuple[str, float], ...]) -> None:  # noqa: ARG002
        return None

    def close(self) -> None:
        self._docker.close()

    # -- helpers ------------------------------------------------------------------------------------

    def _name(self, pool: PoolPolicy) -> str:
        swarm = pool.target.swarm
        if swarm is None:
            raise BackendError(f"pool {pool.name} targets a {pool.target.kind} service, not a Swarm one")
        return swarm.service

    def _inspect(self, pool: PoolPolicy) -> dict[str, Any]:
        name = self._name(pool)
        try:
            info: dict[str, Any] = self._docker.call(
                f"inspect swarm service {name}", lambda c: untyped_api(c).inspect_service(name)
            )
        except DockerNotFoundError as exc:
            raise TargetNotFoundError(
                f"swarm service {name} (pool {pool.name}) does not exist; deploy the stack first, or fix the "
                "name (stack services are named <stack>_<service>)"
            ) from exc
        return info

    def _replicated_spec(self, pool: PoolPolicy) -> tuple[dict[str, Any], int]:
        """The service inspect and its replica count, once it is known to be opted in and replicated."""
        info = self._inspect(pool)
        name = self._name(pool)
        spec = info.get("Spec") or {}
        _require_owner(pool, name, spec)
        mode = spec.get("Mode") or {}
        if "Replicated" not in mode:
            kind = next(iter(mode), "unknown").lower()
            raise BackendError(
                f"swarm service {name} runs in {kind} mode; the autoscaler only scales replicated services "
                "(deploy.mode: replicated)"
            )
        return info, int((mode["Replicated"] or {}).get("Replicas", 0))

    def _update_replicas(self, info: dict[str, Any], desired: int) -> None:
        service_id, version = str(info["ID"]), int(info["Version"]["Index"])
        name = str(info["Spec"].get("Name", service_id))
        spec = replicas_only(info["Spec"], desired)

        def update(client: docker.DockerClient) -> None:
            # The spec as read, only the count changed, as `docker service scale` does. docker-py's
            # update_service(fetch_current_spec=True) rebuilds the task template from its own types and writes
            # Docker's defaults back (DNSConfig {}, a RestartPolicy): Swarm sees a new template and restarts
            # every replica, exactly when the pool needs capacity.
            api = untyped_api(client)
            response = api._post_json(
                api._url("/services/{0}/update", service_id), data=spec, params={"version": version}
            )
            api._raise_for_status(response)

        # No blind retry: a retried update would carry the same stale version; scale() re-reads instead.
        self._docker.call(f"update the replicas of swarm service {name}", update, retry=False)


def replicas_only(spec: dict[str, Any], replicas: int) -> dict[str, Any]:
    """`spec` (a service's Spec, as inspected) with only its replica count changed."""
    mode = dict(spec.get("Mode") or {})
    mode["Replicated"] = {**(mode.get("Replicated") or {}), "Replicas": replicas}
    return {**spec, "Mode": mode}


def _require_owner(pool: PoolPolicy, name: str, spec: dict[str, Any]) -> None:
    owner = (spec.get("Labels") or {}).get(OWNER_LABEL)
    if owner == pool.name:
        return
    if owner is not None:
        raise BackendError(
            f"swarm service {name} is labelled {OWNER_LABEL}={owner}, not {pool.name}: fix the label or the "
            "pool's target"
        )
    container_labels = ((spec.get("TaskTemplate") or {}).get("ContainerSpec") or {}).get("Labels") or {}
    hint = (
        " (it is set on the containers: in a stack file it goes under `deploy.labels`, not `labels`)"
        if OWNER_LABEL in container_labels
        else ""
    )
    raise BackendError(
        f"swarm service {name} has no service label {OWNER_LABEL}={pool.name}{hint}; add it under "
        "`deploy: {labels: ...}` in the stack file (or `docker service update --label-add`) to let the "
        "autoscaler manage it"
    )


def _is_version_conflict(exc: BackendError) -> bool:
    return isinstance(exc, DockerConflictError) or _OUT_OF_SEQUENCE in str(exc)


def _detail(name: str, wanted: int, counts: TaskCounts, *, updating: bool) -> str:
    parts = [f"swarm service {name}: {wanted} wanted, {counts.running} running"]
    if counts.starting:
        parts.append(f"{counts.starting} starting")
    if counts.stopping:
        parts.append(f"{counts.stopping} stopping")
    if counts.failed:
        parts.append(f"{counts.failed} failed in recent task history")
    if updating:
        parts.append("a rolling update is in progress")
    return ", ".join(parts)
