"""What a Compose pool's status finds wrong with its replicas, and the repairs a tick makes.

Never-started clones of a crashed scale-up are removed once old; clean-exited clones that no drain will
remove (a controller died between their stop and their removal) are removed, the newest kept at zero as
the template; failed replicas are diagnosed once (exited with an error, OOM-killed, dead), counted, and all
but the newest few removed; a scale-up whose replicas fail to become running replicas (a start call that fails,
an exit of any code, a restart loop) backs the pool off. In read-only mode
(`autoscaler status`) it only reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Any

from loguru import logger

from autoscaler.backends.base import BackendError
from autoscaler.backends.compose_model import CLONE_LABEL, KEEP_FAILED, Replica, ReplicaProblems, ServiceRef
from autoscaler.backends.docker_client import DockerNotFoundError, docker_time
from autoscaler.backends.start_backoff import StartBackoff
from autoscaler.policy.model import PoolPolicy

__all__ = ["UNHEALTHY_GRACE", "ReplicaFailureHook", "ReplicaHealth"]

# How long a running replica may stay unhealthy (after Docker's own retries) before it is replaced. Plain
# Docker never restarts an unhealthy container: the autoscaler owns the pool's replicas, so it does.
UNHEALTHY_GRACE = 60.0

# Called once per replica newly found failed: (pool name, reason: "exited", "oom-killed", "dead" or
# "failed-start" for a scale-up whose replicas failed at start).
ReplicaFailureHook = Callable[[str, str], None]
Inspect = Callable[[str], dict[str, Any]]
Discard = Callable[[str, str], None]
# How many "oom" events the daemon logged for a container (id) since a time (epoch seconds).
OomEvents = Callable[[str, float], int]

# Exit code of a process killed by SIGKILL, which is what the kernel's OOM killer sends.
SIGKILL_EXIT = 137
# How far back to look for an OOM event when Docker gives no start time for the container.
OOM_LOOKBACK = 3600.0


class ReplicaHealth:
    def __init__(
        self,
        *,
        inspect: Inspect,
        discard: Discard,
        oom_events: OomEvents | None = None,
        on_failure: ReplicaFailureHook | None,
        backoff: StartBackoff,
        created_grace: float,
        read_only: bool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._inspect = inspect
        self._discard = discard
        self._oom_events = oom_events
        self._on_failure = on_failure
        self.backoff = backoff
        self._created_grace = created_grace
        self._read_only = read_only
        self._clock = clock
        self._exits: dict[str, dict[str, str]] = {}  # pool -> container id -> why it stopped, once diagnosed
        self._unhealthy_since: dict[str, dict[str, float]] = {}  # pool -> container id -> first seen unhealthy
        self._running: dict[str, list[Replica]] = {}  # pool -> its running replicas at the last status
        self._problems: dict[str, ReplicaProblems] = {}

    def watch_unhealthy(self, pool: PoolPolicy, running: list[Replica]) -> None:
        """Note (at each status) the pool's running replicas and since when each unhealthy one has been so."""
        now = self._clock()
        self._running[pool.name] = running
        unhealthy = {r.id for r in running if r.health == "unhealthy"}
        since = self._unhealthy_since.setdefault(pool.name, {})
        for cid in [cid for cid in since if cid not in unhealthy]:
            del since[cid]
        for cid in unhealthy:
            since.setdefault(cid, now)

    def to_replace(self, pool: PoolPolicy, *, grace: float = UNHEALTHY_GRACE) -> list[Replica]:
        """The one replica (at most, per tick) unhealthy for longer than `grace` at the last status, to be
        drained and replaced.

        When two or more, and half or more of the pool, are unhealthy the cause is shared (the broker is
        down, a bad release): replacing them would only churn, so it is reported and left alone.
        """
        running = self._running.get(pool.name, [])
        since = self._unhealthy_since.get(pool.name, {})
        unhealthy = [r for r in running if r.id in since]
        now = self._clock()
        overdue = [r for r in unhealthy if now - since[r.id] >= grace]
        if not overdue or self._read_only:
            return []
        if len(unhealthy) >= 2 and 2 * len(unhealthy) >= len(running):
            logger.warning(
                "pool {}: {} of {} replicas unhealthy: a shared cause (the broker? a release?), not replacing them",
                pool.name, len(unhealthy), len(running),
            )
            return []
        victim = overdue[0]
        logger.warning(
            "pool {}: replica {} has been unhealthy for {:.0f}s (its liveness check fails); replacing it",
            pool.name, victim.name, now - since[victim.id],
        )
        if self._on_failure is not None:
            self._on_failure(pool.name, "unhealthy")
        del since[victim.id]
        self._running[pool.name] = [r for r in running if r.id != victim.id]
        return [victim]

    def problems(self, pool: PoolPolicy) -> ReplicaProblems:
        return self._problems.get(pool.name, ReplicaProblems())

    def repair_leftovers(self, target: ServiceRef, replicas: list[Replica], *, starting: bool) -> list[Replica]:
        """Remove our own clones created but never started (a crashed scale-up); return the young ones.

        A clone is only ever left in `created` by a scale-up that did not finish: this process's scale-up
        waits for its starts, so when none of ours is under way (`starting` false) such a clone was left by
        an earlier controller, killed or fenced between its create and its start, and nobody will start it.
        Waiting out the grace for it would hold the pool's scale-ups for a minute after a failover. A
        never-started container that is not a clone may be Compose's start under way: it holds the pool
        for the grace, and is then left for the operator.
        """
        now = self._clock()
        pending: list[Replica] = []
        for replica in replicas:
            if replica.state != "created":
                continue
            clone = replica.labels.get(CLONE_LABEL) == "true"
            # Read-only (`autoscaler status`), another process leads: its start may be under way.
            abandoned = clone and not starting and not self._read_only
            if not abandoned and now - replica.created < self._created_grace:
                pending.append(replica)  # a start under way, ours or Compose's
            elif clone and not self._read_only:
                logger.warning("{}: removing {} (created {:.0f}s ago, never started{})", target, replica.name,
                               now - replica.created, "" if starting else " by an earlier controller")
                self._discard(replica.id, replica.name)
        return pending

    def remove_stopped_victims(self, target: ServiceRef, replicas: list[Replica], draining: Collection[str]) -> None:
        """Remove our clones that stopped cleanly (exit 0: a warm shutdown) and that no drain will remove: the
        victims of a controller that died between their stop and their removal. At zero replicas the newest
        is kept, as the template a scale-up clones."""
        if self._read_only:
            return
        stopped = sorted(
            (
                r for r in replicas
                if r.state == "exited" and r.exit_code == 0 and r.labels.get(CLONE_LABEL) == "true"
                and r.id not in draining
            ),
            key=lambda r: r.newest_first_key(),
        )
        if not stopped:
            return
        if not any(r.state == "running" for r in replicas) and len(stopped) == sum(
            1 for r in replicas if r.state == "exited"
        ):
            stopped = stopped[:-1]  # nothing else could serve as the template
        for replica in stopped:
            logger.info("{}: removing {} ({}; stopped by an earlier drain and never removed)", target, replica.name,
                        replica.status)
            self._discard(replica.id, replica.name)
            replicas.remove(replica)

    def note_problems(self, pool: PoolPolicy, replicas: list[Replica], draining: Collection[str]) -> ReplicaProblems:
        counts = {"exited": 0, "oom-killed": 0, "dead": 0, "restarting": 0}
        known = self._exits.get(pool.name, {})
        diagnosed: dict[str, str] = {}
        failed: list[Replica] = []
        for replica in replicas:
            if replica.id in draining:
                continue  # our own victim on its way out, not a failure
            if replica.state == "restarting":
                counts["restarting"] += 1
            elif replica.state in ("exited", "dead"):
                reason = known.get(replica.id) or self._first_seen_exit(pool, replica)
                diagnosed[replica.id] = reason
                if reason != "clean":
                    failed.append(replica)
        for replica in self._prune_failed(failed):
            counts[diagnosed[replica.id]] += 1
        self._exits[pool.name] = diagnosed  # forget containers that are gone
        problems = ReplicaProblems(
            exited=counts["exited"], oom_killed=counts["oom-killed"], dead=counts["dead"],
            restarting=counts["restarting"],
        )
        self._problems[pool.name] = problems
        return problems

    def judge_last_scale_up(self, pool: PoolPolicy, replicas: list[Replica], draining: Collection[str]) -> None:
        """Judge the pool's last scale-up (StartBackoff) on Docker's states of its containers.

        Called before any repair removes a container: a clone that exited 0 at once is a failed start, and was
        removed as a stopped victim before it could be seen. Our own victims (draining) are not judged.
        """
        if self._read_only:
            return
        self.backoff.spare(pool.name, draining)
        states = {r.id: r.state for r in replicas if r.id not in draining}
        failed = self.backoff.observe(pool.name, states, self._clock())
        if failed:
            logger.error("pool {}: the last scale-up failed ({}); backing off before the next one", pool.name, failed)
            if self._on_failure is not None:
                self._on_failure(pool.name, "failed-start")

    def _prune_failed(self, failed: list[Replica]) -> list[Replica]:
        """Remove all but the newest KEEP_FAILED failed replicas; return the ones kept."""
        failed.sort(key=lambda r: r.created, reverse=True)
        if self._read_only:
            return failed
        for replica in failed[KEEP_FAILED:]:
            logger.warning("removing failed replica {} ({}); the newest {} are kept for `docker logs`",
                           replica.name, replica.status, KEEP_FAILED)
            self._discard(replica.id, replica.name)
        return failed[:KEEP_FAILED]

    def _first_seen_exit(self, pool: PoolPolicy, replica: Replica) -> str:
        reason = self._diagnose_exit(replica)
        if reason != "clean" and not self._read_only:
            logger.warning("pool {}: replica {} {} ({})", pool.name, replica.name, reason.replace("-", " "),
                           replica.status)
            if self._on_failure is not None:
                self._on_failure(pool.name, reason)
        return reason

    def _diagnose_exit(self, replica: Replica) -> str:
        if replica.state == "dead":
            return "dead"
        try:
            info = self._inspect(replica.id)
        except DockerNotFoundError:
            return "clean"
        state = info.get("State") or {}
        exit_code = state.get("ExitCode", replica.exit_code)
        if state.get("OOMKilled") or (exit_code == SIGKILL_EXIT and self._oom_logged(replica.id, info)):
            return "oom-killed"
        # Exit 0 is a replica stopped on purpose (ours or an operator's `docker stop`), not a failure.
        return "exited" if exit_code else "clean"

    def _oom_logged(self, container_id: str, info: dict[str, Any]) -> bool:
        """Whether the daemon logged an OOM kill of this container, for a SIGKILL exit it did not flag.

        Docker sets `State.OOMKilled` only if containerd's OOM event reaches it before the exit event; the
        two race, and on a busy host the exit can win, leaving exit 137 and OOMKilled false (seen in CI).
        The daemon still logs the late "oom" event, so a SIGKILLed replica with a memory limit is looked up
        there: one events query, only for such a replica, once. The daemon keeps only its last 256 events
        (healthchecks add three per probe), so on a busy host an old kill may have scrolled out: "exited".
        """
        if self._oom_events is None or not (info.get("HostConfig") or {}).get("Memory"):
            return False
        created = docker_time(info.get("Created"), default=self._clock() - OOM_LOOKBACK)
        since = docker_time((info.get("State") or {}).get("StartedAt"), default=created)
        try:
            return self._oom_events(container_id, since - 1) > 0
        except BackendError as exc:
            logger.debug("no oom events for {}: {}", container_id[:12], exc)
            return False

