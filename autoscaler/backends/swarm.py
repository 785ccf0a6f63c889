"""The Swarm backend: scales a replicated Swarm service by updating its replica count.

Swarm does the placing, starting and stopping itself; this backend only reads the service's spec and
tasks and writes `Spec.Mode.Replicated.Replicas`. The update is optimistic (it carries the object version
it read), so a concurrent `docker service update` makes it fail with "update out of sequence"; the
backend then re-reads and tries again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import docker
from loguru import logger

from autoscaler.backends.base import OWNER_LABEL, BackendError, TargetNotFoundError, TargetStatus
from autoscaler.backends.docker_client import (
    DockerConflictError,
    DockerConnection,
    DockerNotFoundError,
    docker_time,
    untyped_api,
)
from autoscaler.backends.swarm_drain import SwarmDrainer, WorkerControl
from autoscaler.policy.model import PoolPolicy
from autoscaler.types import NO_STANDBY, StandbyPlan, StartBackoffState

__all__ = ["START_BOUND", "UPDATE_ATTEMPTS", "SwarmBackend", "TaskCounts", "count_tasks", "replicas_only"]

# Version conflicts come from a concurrent update; a few fresh re-reads always get through one.
UPDATE_ATTEMPTS = 5
_OUT_OF_SEQUENCE = "update out of sequence"
# Task states before "running" (https://docs.docker.com/engine/swarm/how-swarm-mode-works/swarm-task-states/).
_STARTING_STATES = frozenset({"new", "pending", "assigned", "accepted", "ready", "preparing", "starting"})
_FAILED_STATES = frozenset({"failed", "rejected", "orphaned"})
_ALIVE_STATES = _STARTING_STATES | {"running"}
# A scale-up waits this long at most for tasks that are still starting (image pulls included); a task not
# placed or started by then no longer holds the pool, and is reported as unplaceable.
START_BOUND = 120.0
# How the scheduler words "no node can take this task" in a pending task's Status.Err.
_NO_NODE = ("no suitable node", "insufficient resources")


@dataclass(frozen=True, slots=True)
class TaskCounts:
    """A service's tasks by what they are doing now."""

    running: int = 0
    starting: int = 0  # on their way up, for less than START_BOUND: a scale-up waits for them
    stopping: int = 0  # being stopped (warm shutdown): never counted, never waited for
    failed: int = 0  # failed tasks still in the task history
    unplaceable: int = 0  # not placed (no node can take them) or not started within START_BOUND
    unplaceable_reason: str = ""


def count_tasks(
    tasks: list[dict[str, Any]], *, now: float | None = None, start_bound: float = START_BOUND
) -> TaskCounts:
    """Running / starting / stopping / unplaceable tasks, and failed ones still in the task history."""
    now = time.time() if now is None else now
    running = starting = stopping = failed = unplaceable = 0
    reasons: list[str] = []
    for task in tasks:
        status = task.get("Status") or {}
        state = str(status.get("State", ""))
        desired = str(task.get("DesiredState", ""))
        if state in _FAILED_STATES:
            failed += 1
        elif desired == "running" and state == "running":
            running += 1
        elif desired == "running" and state in _STARTING_STATES:
            error = str(status.get("Err") or "")
            age = now - docker_time(task.get("CreatedAt"), default=now)
            if any(words in error for words in _NO_NODE) or age >= start_bound:
                unplaceable += 1
                reasons.append(error or f"{state} for {age:.0f}s")
            else:
                starting += 1
        elif desired != "running" and state in _ALIVE_STATES:
            stopping += 1
    reason = max(set(reasons), key=reasons.count) if reasons else ""
    return TaskCounts(running, starting, stopping, failed, unplaceable, reason)


class SwarmBackend:
    """Backend for `target: {swarm: {service}}` pools; needs the daemon to be a Swarm manager."""

    def __init__(
        self,
        *,
        docker_connection: DockerConnection,
        update_attempts: int = UPDATE_ATTEMPTS,
        start_bound: float = START_BOUND,
        clock: Callable[[], float] = time.time,
        control: WorkerControl | None = None,
        lease_term: Callable[[], int] | None = None,
    ) -> None:
        """`control` (Celery's remote control) lets a scale-down drain idle workers first (swarm_drain.py);
        without it, Swarm chooses which tasks to stop. `lease_term` (`Fence.term`) lets a drain paused by a
        lost lease check go on only under the lease it began with."""
        self._docker = docker_connection
        self._update_attempts = update_attempts
        self._start_bound = start_bound
        self._clock = clock
        self._drainer = None if control is None else SwarmDrainer(
            control=control, list_tasks=self._tasks, set_replicas=self._set_replicas,
            fence=docker_connection.check_fence, lease_term=lease_term, clock=clock,
        )

    def check(self, pool: PoolPolicy) -> None:
        self._replicated_spec(pool)

    def status(self, pool: PoolPolicy) -> TargetStatus:
        """`running` is what runs. A scale-down is always allowed; a scale-up waits for tasks still starting,
        and for a rolling update, for START_BOUND at most. Tasks no node can take are reported, not waited for."""
        info, wanted = self._replicated_spec(pool)
        name = self._name(pool)
        tasks = self._tasks(str(info["ID"]))
        now = self._clock()
        draining = self._drainer.draining(pool.name) if self._drainer is not None else set()
        in_shutdown = [t for t in tasks if str(t.get("ID")) in draining]
        counts = count_tasks(
            [t for t in tasks if str(t.get("ID")) not in draining], now=now, start_bound=self._start_bound
        )
        # Victims in their warm shutdown and tasks Swarm is stopping still run: not capacity, counted toward max.
        still_running = sum(1 for t in in_shutdown if str((t.get("Status") or {}).get("State", "")) in _ALIVE_STATES)
        stopping = counts.stopping + still_running
        counts = replace(counts, stopping=counts.stopping + len(in_shutdown))
        update = info.get("UpdateStatus") or {}
        updating = str(update.get("State", "")) in ("updating", "rollback_started") and (
            now - docker_time(update.get("StartedAt"), default=now) < self._start_bound
        )
        # During a drain the spec is `final` + victims still running (within max + surge): the pool was asked
        # for `final`.
        final = self._drainer.final(pool.name) if self._drainer is not None else None
        return TargetStatus(
            running=counts.running,
            ready=not counts.starting and not updating,
            down_ready=True,
            wanted=wanted if final is None else final,
            unplaceable=counts.unplaceable,
            detail=_detail(name, wanted, counts, updating=updating),
            draining=stopping,
        )

    def scale(self, pool: PoolPolicy, *, current: int, desired: int, standby: StandbyPlan = NO_STANDBY) -> None:
        if standby:
            # The policy refuses `warm` on a Swarm target (model.py); this is the backend refusing even if asked.
            raise BackendError(f"pool {pool.name}: warm standbys are not supported on Swarm")
        if self._drainer is not None:
            final = self._drainer.final(pool.name)
            if final is not None and desired >= final:
                # A drain is under way: its watcher moves the count to `desired` + victims still running.
                self._drainer.retarget(pool.name, desired)
                return
            if desired < current or (final is not None and desired < final):
                # Lower than before (a drain under way included): more idle victims, never Swarm's choice.
                info, _ = self._replicated_spec(pool)
                if self._drainer.begin(pool, info, self._tasks(str(info["ID"])), desired=desired):
                    return
                if final is not None:
                    self._drainer.retarget(pool.name, desired)  # its watcher owns the count until it ends
                    return
        self._set_replicas(pool, desired)

    def drain_marks(self, pool: PoolPolicy) -> tuple[tuple[str, float], ...]:
        return self._drainer.marks(pool.name) if self._drainer is not None else ()

    def resume_drains(self, pool: PoolPolicy, marks: tuple[tuple[str, float], ...]) -> None:
        if self._drainer is None or not marks:
            return
        info, wanted = self._replicated_spec(pool)
        self._drainer.resume(pool, info, self._tasks(str(info["ID"])), marks, replicas=wanted)

    def standby_marks(self, pool: PoolPolicy) -> tuple[tuple[str, str], ...]:  # noqa: ARG002 - protocol
        return ()

    def resume_standbys(self, pool: PoolPolicy, marks: tuple[tuple[str, str], ...]) -> None:  # noqa: ARG002
        return None

    def start_backoff(self, pool: PoolPolicy) -> StartBackoffState:  # noqa: ARG002 - protocol
        return StartBackoffState()  # Swarm creates and restarts the tasks itself, paced by its restart policy

    def resume_start_backoff(self, pool: PoolPolicy, saved: StartBackoffState) -> None:  # noqa: ARG002
        return None

    def replace_unhealthy(self, pool: PoolPolicy) -> int:  # noqa: ARG002 - protocol
        return 0  # Swarm replaces a task whose healthcheck fails by itself

    def close(self) -> None:
        if self._drainer is not None:
            self._drainer.close()
        self._docker.close()

    # -- helpers ------------------------------------------------------------------------------------

    def _tasks(self, service_id: str) -> list[dict[str, Any]]:
        tasks: list[dict[str, Any]] = self._docker.call(
            f"list the tasks of swarm service {service_id}",
            lambda c: untyped_api(c).tasks(filters={"service": service_id}),
        )
        return tasks

    def _set_replicas(self, pool: PoolPolicy, desired: int) -> None:
        """Write `desired` into the service's replica spec (re-read and retried on a version conflict)."""
        name = self._name(pool)
        for attempt in range(1, self._update_attempts + 1):
            info, wanted = self._replicated_spec(pool)
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
    if counts.unplaceable:
        parts.append(f"{counts.unplaceable} cannot be placed ({counts.unplaceable_reason})")
    if counts.failed:
        parts.append(f"{counts.failed} failed in recent task history")
    if updating:
        parts.append("a rolling update is in progress")
    return ", ".join(parts)
