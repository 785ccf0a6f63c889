"""The Compose backend: scales a Compose service by cloning and removing its containers via the Engine API.

A pool's replicas are the containers Compose labels with the project and service (one-off `run`
containers excluded) that also carry `autoscaler.pool=<pool>`. Scaling up clones an existing replica —
config, host config, networks and every label, with the next container number — so `docker compose ps`,
`logs` and `down` treat the clones as their own. Scaling down stops the newest idle replicas with the
pool's grace period (SIGTERM: Celery's warm shutdown) in background threads, then removes them.

Convergent rather than transactional: every call re-reads the containers, so a controller that crashed
mid-scale is repaired by the next tick (leftover never-started containers are removed; the running count
is the truth).

Docker is the only source of a clone's configuration: the service's own newest container. Scaling to zero
keeps one replica stopped (not removed) so that there is still something to clone; nothing is ever read
from Redis to build a container, because every web and worker container can write the broker (a template
kept there let a broker client start a privileged container with the host's root mounted).
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

import docker
from loguru import logger

from autoscaler.backends.base import OWNER_LABEL, BackendError, TargetNotFoundError, TargetStatus
from autoscaler.backends.compose_clone import START_WORKERS, Cloner
from autoscaler.backends.compose_drain import Drainer, resume_plan
from autoscaler.backends.compose_health import UNHEALTHY_GRACE, ReplicaFailureHook, ReplicaHealth
from autoscaler.backends.compose_model import (
    CREATED_GRACE,
    ONEOFF_LABEL,
    PRESENT_STATES,
    PROJECT_LABEL,
    SERVICE_LABEL,
    Replica,
    ReplicaProblems,
    ServiceRef,
    choose_victims,
    container_ids_from_mounts,
    describe_replicas,
    normalize_project,
    nothing_to_clone,
    room_to_create,
)
from autoscaler.backends.compose_standby import StandbyControl, Standbys, is_standby
from autoscaler.backends.docker_client import DockerConnection, DockerNotFoundError
from autoscaler.backends.docker_events import count_events
from autoscaler.backends.start_backoff import StartBackoff
from autoscaler.policy.model import PoolPolicy
from autoscaler.types import NO_STANDBY, StandbyPlan, StartBackoffState

__all__ = ["BusyProbe", "ComposeBackend", "ReplicaFailureHook"]

# Hostnames of Celery workers running a task (the part after `celery@`), or None when unknown.
class BusyProbe(Protocol):
    """Hostnames of the pool's busy workers, or None if unknown; `hosts`: the hosts of the workers that should
    answer (the probe stops waiting once they all have)."""

    def __call__(self, pool: PoolPolicy, /, *, hosts: frozenset[str] | None = None) -> set[str] | None: ...


class ComposeBackend:
    """Backend for `target: {compose: {service, project}}` pools, talking to the Engine API.

    `default_project` is used for pools that name no project; without it, the project of the container
    this controller runs in. A service scaled to zero keeps one stopped replica, which is what a later
    scale-up clones. `busy_probe` says which Celery workers are running a task, so idle ones are stopped
    first. `on_replica_failure` is called once per replica newly found exited/OOM-killed/dead (for a
    Prometheus counter, also "unhealthy" for a replica replaced after failing its healthcheck for
    `unhealthy_grace` seconds); `unhealthy(pool)` gives the current numbers. `read_only` (for `autoscaler status`)
    reports what a tick would repair and changes nothing.
    """

    def __init__(
        self,
        *,
        docker_connection: DockerConnection,
        default_project: str | None = None,
        busy_probe: BusyProbe | None = None,
        on_replica_failure: ReplicaFailureHook | None = None,
        created_grace: float = CREATED_GRACE,
        unhealthy_grace: float = UNHEALTHY_GRACE,
        start_workers: int = START_WORKERS,
        read_only: bool = False,
        backoff: StartBackoff | None = None,
        clock: Callable[[], float] = time.time,
        standby_control: StandbyControl | None = None,
        on_standby: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self._docker = docker_connection
        self._read_only = read_only
        self._backoff = backoff or StartBackoff()
        self._clock = clock
        self._default_project = normalize_project(default_project) if default_project else None
        self._busy_probe = busy_probe
        self._created_grace = created_grace
        self._unhealthy_grace = unhealthy_grace

        def inspect(cid: str) -> dict[str, Any]:
            return self._inspect(cid, what=f"container {cid[:12]}")

        self._drainer = Drainer(docker_connection, clock=clock)
        self._cloner = Cloner(
            docker_connection, inspect=inspect, discard=self._discard, backoff=self._backoff, clock=clock,
            start_workers=start_workers,
        )
        self._health = ReplicaHealth(
            inspect=inspect, discard=self._discard, oom_events=self._oom_events,
            on_failure=on_replica_failure, backoff=self._backoff, created_grace=created_grace,
            read_only=read_only, clock=clock,
        )
        self._own_project: str | None = None
        self._own_project_known = False
        self._standby_control = standby_control
        self._standbys = Standbys(standby_control, inspect=inspect, fence=docker_connection.check_fence,
                                  read_only=read_only, on_count=on_standby)

    # -- Backend protocol ---------------------------------------------------------------------------

    def check(self, pool: PoolPolicy) -> None:
        target = self._target(pool)
        replicas = self._replicas(pool, target)
        if not replicas:
            raise TargetNotFoundError(nothing_to_clone(target, pool))

    def status(self, pool: PoolPolicy) -> TargetStatus:
        """Running replicas (draining ones excluded); also removes crashed starts."""
        target = self._target(pool)
        # Drains read before the listing: one that ends in between (its victim stopped and removed) would
        # otherwise leave a victim listed but no longer marked, counted as running.
        draining, starting = self._in_flight(pool)
        replicas = self._replicas(pool, target)
        pending = self._health.repair_leftovers(target, replicas, starting=bool(starting))
        self._health.judge_last_scale_up(pool, replicas, draining)  # before a clone that exited 0 is removed
        self._health.remove_stopped_victims(target, replicas, draining)
        problems = self._health.note_problems(pool, replicas, draining)
        running = [r for r in replicas if r.state == "running" and r.id not in draining]
        self._health.watch_unhealthy(pool, running)
        self._standbys.verify(pool, running)
        running, standbys = self._standbys.split(pool, running)
        unhealthy_yet = sum(1 for r in running if r.health == "starting")
        # Only our own creates hold the pool. Draining replicas are already left out of `running`, so a tick
        # during a long warm shutdown neither stops another victim nor re-creates one, and a burst that
        # arrives meanwhile still scales up at once, as far as max allows (victims count toward it). Replicas
        # still in their healthcheck's start period are reported, not waited for: the policy's up-cooldown is
        # the warm-up knob, and a start period of a minute must not freeze the pool in both directions.
        ready = not starting and not pending
        detail = describe_replicas(
            running=len(running), unhealthy_yet=unhealthy_yet, starting=max(starting, len(pending)),
            draining=len(draining), problems=problems,
        ) + (f", {len(standbys)} standby" if standbys else "")
        backing_off = self._backoff.blocked(pool.name, self._clock())
        if backing_off:
            detail += f"; {backing_off}"
        # Victims in their warm shutdown still run: not capacity, but counted toward max (the decision caps).
        stopping = sum(1 for r in replicas if r.id in draining and r.state in PRESENT_STATES)
        memory = self._standbys.report(pool, standbys)
        return TargetStatus(running=len(running), ready=ready, detail=f"{target}: {detail}", draining=stopping,
                            standby=len(standbys), standby_memory=memory)

    def scale(self, pool: PoolPolicy, *, current: int, desired: int, standby: StandbyPlan = NO_STANDBY) -> None:
        target = self._target(pool)
        draining, _ = self._in_flight(pool)  # before the listing, as in status()
        replicas = self._replicas(pool, target)
        live, standbys = self._standbys.split(
            pool, [r for r in replicas if r.state == "running" and r.id not in draining]
        )
        if len(live) != current:
            # The count moved since status(); acting on the live one keeps a repeated call idempotent.
            logger.info("{}: {} running (loop saw {}); scaling to {}", target, len(live), current, desired)
        activated = 0
        if desired > len(live) and standby.activate:
            # First, and before any create: a standby serves within a second, a new replica boots for seconds.
            activated = self._standbys.activate(pool, standbys, min(standby.activate, desired - len(live)))
            standbys = standbys[activated:]
        if desired < len(live):
            self._scale_down(pool, target, replicas, live, count=len(live) - desired, to_standby=standby.to_standby)
        if desired - activated > len(live) or standby.boot:
            # The activated standbys are capacity in the book now: _room_to_create counts them among the live.
            count, boot = self._room_to_create(pool, target, replicas, desired, standbys=standby.boot)
            self._cloner.scale_up(pool, target, replicas, count=count, standbys=boot)
        if standby.retire:
            self._retire(pool, target, standbys[: standby.retire])

    def _room_to_create(
        self, pool: PoolPolicy, target: ServiceRef, replicas: list[Replica], desired: int, *, standbys: int = 0
    ) -> tuple[int, int]:
        """How many replicas and standbys a scale-up to `desired` may create (compose_model.room_to_create: within
        max, and max + warm with the standbys); BackendError when none, or while the pool backs off (StartBackoff)."""
        blocked = self._backoff.blocked(pool.name, self._clock())
        if blocked:
            raise BackendError(f"{target}: {blocked}")
        draining, _ = self._in_flight(pool)
        running = [r for r in replicas if r.id not in draining and r.state == "running"]
        live, _ = self._standbys.split(pool, running)
        count, boot, refusal = room_to_create(
            pool, replicas, draining=draining, live={r.id for r in live}, desired=desired, standbys=standbys,
            now=self._clock(), created_grace=self._created_grace,
        )
        if refusal:
            raise BackendError(f"{target}: {refusal}")
        return count, boot

    def close(self) -> None:
        self._drainer.close()
        self._cloner.close()
        close_control = getattr(self._standby_control, "close", None)
        if callable(close_control):
            close_control()
        close_probe = getattr(self._busy_probe, "close", None)
        if callable(close_probe):
            close_probe()  # the backend owns the probe it was given (it holds a broker connection)
        self._docker.close()

    # -- draining (state carried across controllers) ------------------------------------------------

    def drain_marks(self, pool: PoolPolicy) -> tuple[tuple[str, float], ...]:
        return self._drainer.marks(pool.name)

    def start_backoff(self, pool: PoolPolicy) -> StartBackoffState:
        return self._backoff.snapshot(pool.name)

    def resume_start_backoff(self, pool: PoolPolicy, saved: StartBackoffState) -> None:
        self._backoff.restore(pool.name, saved, self._clock())

    def resume_drains(self, pool: PoolPolicy, marks: tuple[tuple[str, float], ...]) -> None:
        if not marks or self._read_only:
            return
        target = self._target(pool)
        plan, keep, ignored = resume_plan(
            self._replicas(pool, target), marks, now=self._clock(), stop_timeout=pool.stop_timeout
        )
        if ignored:
            logger.info("{}: {} draining mark(s) name no replica of it (gone, or not its own): {}", target,
                        len(ignored), ", ".join(ignored[:5]))
        for replica, grace in plan:
            logger.info("{}: resuming the drain of {} (begun by an earlier controller; {}s of grace left)",
                        target, replica.name, grace)
            self._drainer.start(pool.name, target, [replica], grace=grace, keep=keep, resumed=True)

    def replace_unhealthy(self, pool: PoolPolicy) -> int:
        """Drain the replica that has stayed unhealthy past `unhealthy_grace` (at most one per tick), like a
        scale-down victim: its running tasks finish, it is no longer counted, and the loop restores the count
        with a fresh clone at once (a repair)."""
        if self._read_only:
            return 0
        # Judged on what this tick's status() saw: no second listing of the containers.
        victims = self._health.to_replace(pool, grace=self._unhealthy_grace)
        if victims:
            self._backoff.spare(pool.name, [v.id for v in victims])  # its exit is ours, not a failed start
            self._drainer.start(pool.name, self._target(pool), victims, grace=math.ceil(pool.stop_timeout))
        return len(victims)

    # -- observability ------------------------------------------------------------------------------

    def unhealthy(self, pool: PoolPolicy) -> ReplicaProblems:
        """Exited/OOM-killed/dead/restarting replicas of the pool at its last `status()` (no Docker call)."""
        return self._health.problems(pool)

    def draining(self, pool: PoolPolicy) -> int:
        """Replicas of the pool being stopped right now."""
        return len(self._drainer.ids(pool.name))

    # -- reading ------------------------------------------------------------------------------------

    def _target(self, pool: PoolPolicy) -> ServiceRef:
        compose = pool.target.compose
        if compose is None:
            raise BackendError(f"pool {pool.name} targets a {pool.target.kind} service, not a Compose one")
        project = normalize_project(compose.project) if compose.project else None
        project = project or self._default_project or self._detect_own_project()
        if not project:
            raise BackendError(
                f"pool {pool.name}: no Compose project for service {compose.service}; set "
                "`target.compose.project` in the policy or AUTOSCALER_COMPOSE_PROJECT (or run the "
                "controller as a service of that project)"
            )
        return ServiceRef(project=project, service=compose.service)

    def _list(self, target: ServiceRef) -> list[Replica]:
        filters = {"label": [f"{PROJECT_LABEL}={target.project}", f"{SERVICE_LABEL}={target.service}"]}
        summaries = self._docker.call(
            f"list the containers of {target}", lambda c: c.api.containers(all=True, filters=filters)
        )
        replicas = [Replica.from_summary(s) for s in summaries]
        return [r for r in replicas if r.labels.get(ONEOFF_LABEL, "False") != "True"]

    def _replicas(self, pool: PoolPolicy, target: ServiceRef) -> list[Replica]:
        """The service's containers, all owned by this pool, or BackendError naming the ones that are not."""
        replicas = self._list(target)
        unowned = [r for r in replicas if r.owner is None]
        if unowned:
            raise BackendError(
                f"service {target.service} in project {target.project} has {len(unowned)} containers without "
                f"label {OWNER_LABEL}={pool.name} ({', '.join(r.name for r in unowned[:5])}); add the label "
                "in compose.yaml to let the autoscaler manage it"
            )
        foreign = [r for r in replicas if r.owner != pool.name]
        if foreign:
            raise BackendError(
                f"{target} is labelled {OWNER_LABEL}={foreign[0].owner}, not {pool.name}: two pools cannot "
                "own one service; fix the label or the pool's target"
            )
        return replicas

    def _in_flight(self, pool: PoolPolicy) -> tuple[set[str], int]:
        """The pool's replicas being stopped, and how many it is creating, right now."""
        return self._drainer.ids(pool.name), self._cloner.starting(pool.name)

    def _detect_own_project(self) -> str | None:
        # Best-effort: the controller running as a Compose service manages its own project by default.
        if not self._own_project_known:
            hostname = socket.gethostname()
            for candidate in [hostname, *container_ids_from_mounts()]:
                try:
                    info = self._inspect(candidate, what="the controller's own container")
                except DockerNotFoundError:
                    continue
                config = info.get("Config") or {}
                # A hostname can also be some other container's name: only our own container has our hostname.
                if config.get("Hostname") != hostname:
                    continue
                self._own_project = (config.get("Labels") or {}).get(PROJECT_LABEL)
                break
            self._own_project_known = True
            if self._own_project:
                logger.info("default Compose project: {} (the controller's own)", self._own_project)
        return self._own_project

    def _inspect(self, container: str, *, what: str) -> dict[str, Any]:
        info: dict[str, Any] = self._docker.call(
            f"inspect {what}", lambda c: c.api.inspect_container(container)
        )
        return info

    def _oom_events(self, container_id: str, since: float) -> int:
        """How many "oom" events the daemon logged for this container since `since` (epoch seconds)."""
        # A time in the future makes the daemon hold the answer until then, so: now, to the microsecond (as
        # a string: docker-py would round a datetime to the second). A remote daemon's clock skew delays it.
        until = f"{time.time():.6f}"

        def count(client: docker.DockerClient) -> int:
            filters = {"type": "container", "container": container_id, "event": "oom"}
            return count_events(client, since=int(since), until=until, filters=filters, action="oom")

        return self._docker.call(f"read the oom events of container {container_id[:12]}", count)

    def _discard(self, container_id: str, name: str) -> None:
        """Force-remove a container we gave up on; never raises (the next tick tries again)."""
        try:
            self._docker.call(
                f"remove container {name}", lambda c: c.api.remove_container(container_id, v=True, force=True)
            )
            logger.info("removed container {}", name)
        except DockerNotFoundError:
            pass
        except BackendError as exc:
            logger.error("could not remove container {}: {}", name, exc)

    # -- scaling down -------------------------------------------------------------------------------

    def _scale_down(
        self, pool: PoolPolicy, target: ServiceRef, replicas: list[Replica], live: list[Replica], *, count: int,
        to_standby: int = 0,
    ) -> None:
        busy = self._busy(pool, frozenset(r.short_id for r in live))
        if to_standby:
            # Idle replicas that were standbys go back to standby (a later burst activates them at once); the
            # rest drain. A plain replica cannot: its command consumes the pool's queues from boot.
            returned = self._standbys.give_back(pool, live, min(to_standby, count), busy)
            if returned:
                logger.info("{}: returned {} to standby", target, ", ".join(r.name for r in returned))
            count -= len(returned)
            live = [r for r in live if r not in returned]
            if count <= 0:
                return
        victims = choose_victims(live, count=count, busy=busy)
        grace = math.ceil(pool.stop_timeout)
        # To zero: the last container of the service is stopped but kept, as the template a later scale-up
        # clones (Docker stays the only source of a container's configuration).
        chosen = {v.id for v in victims}
        # Standbys that stay are no template (their label, their private queue): the last plain one is kept.
        plain = [v for v in victims if not is_standby(v)]
        keep = plain[-1].id if plain and all(r.id in chosen for r in replicas if not is_standby(r)) else None
        self._backoff.spare(pool.name, chosen)  # their exits are ours, not failed starts
        self._drainer.start(pool.name, target, victims, grace=grace, keep=keep)
        logger.debug(
            "{}: stopping {} (grace {}s; busy workers: {})",
            target, [v.name for v in victims], grace, "unknown" if busy is None else len(busy),
        )

    def _retire(self, pool: PoolPolicy, target: ServiceRef, standbys: list[Replica]) -> None:
        """Stop standbys above `warm` (the policy lowered it): they run nothing, so a short grace is enough."""
        if standbys:
            self._backoff.spare(pool.name, [r.id for r in standbys])
            self._drainer.start(pool.name, target, standbys, grace=math.ceil(min(pool.stop_timeout, 30.0)))

    # -- warm standbys (compose_standby.py) -----------------------------------------------------------

    def standby_marks(self, pool: PoolPolicy) -> tuple[tuple[str, str], ...]:
        return self._standbys.book.marks(pool.name)

    def resume_standbys(self, pool: PoolPolicy, marks: tuple[tuple[str, str], ...]) -> None:
        self._standbys.book.restore(pool.name, marks)

    def _busy(self, pool: PoolPolicy, hosts: frozenset[str] | None = None) -> set[str] | None:
        if self._busy_probe is None:
            return None
        # The probe waits out its whole timeout (about a second) between two lease checks: renew the lease
        # right before it, so that the stop that follows does not find it lapsed at a short interval.
        self._docker.check_fence(f"ask which workers of pool {pool.name} are busy")
        try:
            return self._busy_probe(pool, hosts=hosts)
        except Exception as exc:  # a probe failure must never stop a scale-down
            logger.warning("pool {}: busy-worker probe failed ({}); choosing victims by age", pool.name, exc)
            return None
