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
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
from loguru import logger

from autoscaler.backends.base import OWNER_LABEL, BackendError, TargetNotFoundError, TargetStatus
from autoscaler.backends.docker_client import DockerConnection, DockerNotFoundError, untyped_api
from autoscaler.backends.start_backoff import StartBackoff
from autoscaler.policy.model import PoolPolicy

__all__ = [
    "CLONE_LABEL",
    "CONTAINER_NUMBER_LABEL",
    "CREATED_GRACE",
    "KEEP_FAILED",
    "ONEOFF_LABEL",
    "PROJECT_LABEL",
    "SERVICE_LABEL",
    "BusyProbe",
    "ComposeBackend",
    "Replica",
    "ReplicaFailureHook",
    "ReplicaProblems",
    "choose_victims",
    "clone_config",
    "normalize_project",
]

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
CONTAINER_NUMBER_LABEL = "com.docker.compose.container-number"
ONEOFF_LABEL = "com.docker.compose.oneoff"
VERSION_LABEL = "com.docker.compose.version"
# Marks the containers this backend created, so only its own crashed starts are ever cleaned up: a
# `docker compose create` / `up --no-start` container of the same service is the operator's to start.
CLONE_LABEL = "autoscaler.clone"
# A `created` container younger than this may be `docker compose up` between create and start; older
# ones are leftovers of a start that crashed and are removed.
CREATED_GRACE = 60.0
# Failed replicas kept for `docker logs`/`inspect`; older ones are removed so a crash loop cannot pile up
# exited containers tick after tick.
KEEP_FAILED = 5
START_WORKERS = 8
STOP_WORKERS = 32
# On close, how long to let stops that are under way finish their remove step.
CLOSE_GRACE = 5.0
# Container fields that belong to one container only and must not be cloned.
_PER_CONTAINER_CONFIG = ("Hostname", "MacAddress")
# Containers that exist as replicas (stopped ones are the kept template or failures kept for their logs).
_PRESENT_STATES = frozenset({"running", "restarting", "paused", "created"})
_EXIT_CODE = re.compile(r"^Exited \((-?\d+)\)")
_HEALTH = re.compile(r"\((health: starting|healthy|unhealthy)\)")
_CONTAINER_ID_IN_MOUNTS = re.compile(r"/containers/([0-9a-f]{64})/")

# Hostnames of Celery workers running a task (the part after `celery@`), or None when unknown.
BusyProbe = Callable[[PoolPolicy], set[str] | None]
# Called once per replica newly found failed: (pool name, reason: "exited", "oom-killed" or "dead").
ReplicaFailureHook = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class Replica:
    """One container of a Compose service, from the container list (no inspect needed)."""

    id: str
    name: str
    state: str
    status: str
    created: float
    labels: dict[str, str]

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> Replica:
        names = summary.get("Names") or ["/" + str(summary["Id"])[:12]]
        return cls(
            id=str(summary["Id"]),
            name=str(names[0]).lstrip("/"),
            state=str(summary.get("State", "")),
            status=str(summary.get("Status", "")),
            created=float(summary.get("Created", 0)),
            labels=dict(summary.get("Labels") or {}),
        )

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def number(self) -> int:
        try:
            return int(self.labels.get(CONTAINER_NUMBER_LABEL, "0"))
        except ValueError:
            return 0

    @property
    def owner(self) -> str | None:
        return self.labels.get(OWNER_LABEL)

    @property
    def health(self) -> str | None:
        found = _HEALTH.search(self.status)
        return found.group(1).removeprefix("health: ") if found else None

    @property
    def exit_code(self) -> int | None:
        found = _EXIT_CODE.match(self.status)
        return int(found.group(1)) if found else None

    def newest_first_key(self) -> tuple[int, float]:
        return (self.number, self.created)


@dataclass(frozen=True, slots=True)
class ReplicaProblems:
    """Replicas of a pool that are present but not working, as seen by the last `status()`."""

    exited: int = 0
    oom_killed: int = 0
    dead: int = 0
    restarting: int = 0

    @property
    def total(self) -> int:
        return self.exited + self.oom_killed + self.dead + self.restarting

    def describe(self) -> str:
        parts = [
            f"{count} {label}"
            for count, label in (
                (self.exited, "exited with an error"),
                (self.oom_killed, "OOM-killed"),
                (self.dead, "dead"),
                (self.restarting, "restarting"),
            )
            if count
        ]
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class _Target:
    project: str
    service: str

    def __str__(self) -> str:
        return f"compose service {self.service} in project {self.project}"


@dataclass(frozen=True, slots=True)
class _Endpoint:
    network: str
    aliases: tuple[str, ...]
    links: tuple[tuple[str, str], ...]
    driver_opts: dict[str, str] | None


@dataclass(frozen=True, slots=True)
class _Clone:
    """Everything needed to create one new replica."""

    name: str
    config: dict[str, Any]
    primary: _Endpoint | None
    others: tuple[_Endpoint, ...]


def normalize_project(name: str) -> str:
    """Compose's own project-name normalisation (lower case, only [a-z0-9_-]), so `MyApp` finds `myapp`."""
    return re.sub(r"[^-_a-z0-9]", "", name.lower()).lstrip("-_")


def choose_victims(replicas: Sequence[Replica], *, count: int, busy: set[str] | None) -> list[Replica]:
    """The `count` replicas to stop: idle before busy, then newest (highest container number) first."""
    busy_hosts = busy or set()

    def key(replica: Replica) -> tuple[bool, int, float]:
        number, created = replica.newest_first_key()
        return (replica.short_id in busy_hosts, -number, -created)

    return sorted(replicas, key=key)[: max(count, 0)]


def _name_separator(template: dict[str, Any], target: _Target) -> str:
    # docker-compose v1 names replicas project_service_N, v2 project-service-N: follow the template.
    labels = template["Config"].get("Labels") or {}
    name = str(template.get("Name", "")).lstrip("/")
    number = labels.get(CONTAINER_NUMBER_LABEL, "")
    for separator in ("-", "_"):
        if name == separator.join((target.project, target.service, number)):
            return separator
    return "_" if str(labels.get(VERSION_LABEL, "")).startswith("1.") else "-"


def _endpoint(network: str, settings: dict[str, Any], *, template: dict[str, Any], name: str) -> _Endpoint:
    template_name = str(template.get("Name", "")).lstrip("/")
    own = {str(template.get("Id", ""))[:12], template_name}
    aliases = [a for a in settings.get("Aliases") or [] if a not in own]
    if template_name in (settings.get("Aliases") or []):
        aliases.insert(0, name)  # Compose v2 aliases each container by its own name
    links = tuple(_split_link(str(link)) for link in settings.get("Links") or [])
    if network in ("bridge", "host", "none"):
        aliases = []  # the daemon refuses aliases outside user-defined networks
    ipam = settings.get("IPAMConfig") or {}
    if ipam.get("IPv4Address") or ipam.get("IPv6Address"):
        logger.warning("{}: the template has a fixed IP on {}; a clone gets one from the pool", name, network)
    return _Endpoint(network, tuple(dict.fromkeys(aliases)), links, settings.get("DriverOpts") or None)


def _split_link(link: str) -> tuple[str, str]:
    container, _, alias = link.partition(":")
    return container, alias or container


def _endpoints(template: dict[str, Any], *, name: str) -> tuple[_Endpoint | None, tuple[_Endpoint, ...]]:
    mode = str(template["HostConfig"].get("NetworkMode") or "")
    networks: dict[str, Any] = template.get("NetworkSettings", {}).get("Networks") or {}
    if mode in ("host", "none") or mode.startswith(("container:", "service:")) or not networks:
        return None, ()
    endpoints = [_endpoint(net, networks[net], template=template, name=name) for net in sorted(networks)]
    # API < 1.44 accepts one network at create; the others are connected before the first start.
    primary = next((e for e in endpoints if e.network == mode), endpoints[0])
    return primary, tuple(e for e in endpoints if e is not primary)


def clone_config(template: dict[str, Any], *, pool: str, number: int, image: str) -> dict[str, Any]:
    """The create body for a clone of `template` (a `docker inspect`): same config and host config.

    The host config is passed through whole rather than rebuilt with `create_host_config`: the daemon
    accepts its own inspect output, and every option (limits, mounts, init, caps, tmpfs, ulimits, log
    config, restart policy...) is kept, including ones docker-py has no keyword for.
    """
    config = {k: v for k, v in template["Config"].items() if k not in _PER_CONTAINER_CONFIG}
    config["Image"] = image
    config["Labels"] = {
        **(template["Config"].get("Labels") or {}),
        CONTAINER_NUMBER_LABEL: str(number),
        OWNER_LABEL: pool,
        CLONE_LABEL: "true",
    }
    host_config = dict(template["HostConfig"])
    host_config["ContainerIDFile"] = ""
    config["HostConfig"] = host_config
    return config


class ComposeBackend:
    """Backend for `target: {compose: {service, project}}` pools, talking to the Engine API.

    `default_project` is used for pools that name no project; without it, the project of the container
    this controller runs in. A service scaled to zero keeps one stopped replica, which is what a later
    scale-up clones. `busy_probe` says which Celery workers are running a task, so idle ones are stopped
    first. `on_replica_failure` is called once per replica newly found exited/OOM-killed/dead (for a
    Prometheus counter); `unhealthy(pool)` gives the current numbers.
    """

    def __init__(
        self,
        *,
        docker_connection: DockerConnection,
        default_project: str | None = None,
        busy_probe: BusyProbe | None = None,
        on_replica_failure: ReplicaFailureHook | None = None,
        created_grace: float = CREATED_GRACE,
        start_workers: int = START_WORKERS,
        read_only: bool = False,
        backoff: StartBackoff | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._docker = docker_connection
        # For `autoscaler status`, which is a read: it reports what a tick would repair but removes nothing
        # (it runs without the leader lock, beside a controller that may be acting).
        self._read_only = read_only
        self._backoff = backoff or StartBackoff()
        self._clock = clock
        self._default_project = normalize_project(default_project) if default_project else None
        self._busy_probe = busy_probe
        self._on_failure = on_replica_failure
        self._created_grace = created_grace
        self._starter = ThreadPoolExecutor(max_workers=start_workers, thread_name_prefix="compose-start")
        self._stopper = ThreadPoolExecutor(max_workers=STOP_WORKERS, thread_name_prefix="compose-stop")
        self._lock = threading.Lock()
        self._draining: dict[str, tuple[str, Future[None]]] = {}  # container id -> (pool, stop)
        self._deadlines: dict[str, float] = {}  # container id -> when its stop's grace ends
        self._starting: dict[str, int] = {}  # pool -> containers being created/started
        self._exits: dict[str, dict[str, str]] = {}  # pool -> container id -> why it stopped, once diagnosed
        self._problems: dict[str, ReplicaProblems] = {}
        self._seen_templates: dict[_Target, dict[str, Any]] = {}  # inspect of the newest replica seen
        self._own_project: str | None = None
        self._own_project_known = False

    # -- Backend protocol ---------------------------------------------------------------------------

    def check(self, pool: PoolPolicy) -> None:
        target = self._target(pool)
        replicas = self._replicas(pool, target)
        if not replicas:
            raise TargetNotFoundError(_nothing_to_clone(target, pool))

    def status(self, pool: PoolPolicy) -> TargetStatus:
        """Running replicas (draining ones excluded); also removes crashed starts."""
        target = self._target(pool)
        replicas = self._replicas(pool, target)
        pending = self._repair_leftovers(target, replicas)
        self._remove_stopped_victims(pool, target, replicas)
        problems = self._note_problems(pool, replicas)
        self._judge_last_scale_up(pool, replicas)
        draining, starting = self._in_flight(pool)
        running = [r for r in replicas if r.state == "running" and r.id not in draining]
        unhealthy_yet = sum(1 for r in running if r.health == "starting")
        # Only our own creates hold the pool. Draining replicas are already left out of `running`, so a tick
        # during a long warm shutdown neither stops another victim nor re-creates one, and a burst that
        # arrives meanwhile still scales up at once. Replicas still in their healthcheck's start period are
        # reported, not waited for: the policy's up-cooldown is the warm-up knob, and a start period of
        # a minute must not freeze the pool in both directions.
        ready = not starting and not pending
        detail = _detail(
            running=len(running), unhealthy_yet=unhealthy_yet, starting=max(starting, len(pending)),
            draining=len(draining), problems=problems,
        )
        backing_off = self._backoff.blocked(pool.name, self._clock())
        if backing_off:
            detail += f"; {backing_off}"
        return TargetStatus(running=len(running), ready=ready, detail=f"{target}: {detail}")

    def scale(self, pool: PoolPolicy, *, current: int, desired: int) -> None:
        target = self._target(pool)
        replicas = self._replicas(pool, target)
        draining, _ = self._in_flight(pool)
        live = [r for r in replicas if r.state == "running" and r.id not in draining]
        if len(live) != current:
            # The count moved since status(); acting on the live one keeps a repeated call idempotent.
            logger.info("{}: {} running (loop saw {}); scaling to {}", target, len(live), current, desired)
        if desired > len(live):
            self._scale_up(pool, target, replicas, count=self._room_to_create(pool, target, replicas, desired))
        elif desired < len(live):
            self._scale_down(pool, target, replicas, live, count=len(live) - desired)

    def _room_to_create(self, pool: PoolPolicy, target: _Target, replicas: list[Replica], desired: int) -> int:
        """How many containers a scale-up to `desired` may create; BackendError when none.

        Replicas that are restarting, paused or just created count as capacity on their way (a crash loop
        with `restart: unless-stopped` is "restarting", never running), and every container that exists
        and is not stopped counts against `max`, whatever its state: the autoscaler never has more than
        `max` of a pool. A pool whose last scale-ups kept failing backs off (StartBackoff).
        """
        blocked = self._backoff.blocked(pool.name, self._clock())
        if blocked:
            raise BackendError(f"{target}: {blocked}")
        draining, _ = self._in_flight(pool)
        present = [r for r in replicas if r.id not in draining and r.state in _PRESENT_STATES]
        live = [r for r in present if r.state == "running"]
        now = self._clock()
        # An old `created` container that is not ours is the operator's: counted against max, not as coming.
        coming = [
            r for r in present
            if r.state in ("restarting", "paused") or (r.state == "created" and now - r.created < self._created_grace)
        ]
        count = min(desired - len(live) - len(coming), pool.max - len(present))
        if count <= 0:
            raise BackendError(
                f"{target}: {len(coming)} replica(s) restarting or starting ({', '.join(r.name for r in coming[:3])}) "
                f"already make up the {desired - len(live)} wanted; not creating more"
                if coming
                else f"{target}: {len(present)} containers exist, max is {pool.max}; not creating more"
            )
        return count

    def _judge_last_scale_up(self, pool: PoolPolicy, replicas: list[Replica]) -> None:
        if self._read_only:
            return
        exits = self._exits.get(pool.name, {})
        states = {
            r.id: "failed" if r.state in ("exited", "dead") and exits.get(r.id, "clean") != "clean" else r.state
            for r in replicas
        }
        failed = self._backoff.observe(pool.name, states, self._clock())
        if failed:
            logger.error("pool {}: the last scale-up failed ({}); backing off before the next one", pool.name, failed)
            if self._on_failure is not None:
                self._on_failure(pool.name, "failed-start")

    def close(self) -> None:
        with self._lock:
            stops = [future for _, future in self._draining.values()]
        wait(stops, timeout=CLOSE_GRACE)
        self._stopper.shutdown(wait=False, cancel_futures=True)
        self._starter.shutdown(wait=False, cancel_futures=True)
        close_probe = getattr(self._busy_probe, "close", None)
        if callable(close_probe):
            close_probe()  # the backend owns the probe it was given (it holds a broker connection)
        self._docker.close()

    # -- observability ------------------------------------------------------------------------------

    def unhealthy(self, pool: PoolPolicy) -> ReplicaProblems:
        """Exited/OOM-killed/dead/restarting replicas of the pool at its last `status()` (no Docker call)."""
        return self._problems.get(pool.name, ReplicaProblems())

    def draining(self, pool: PoolPolicy) -> int:
        """Replicas of the pool being stopped right now."""
        return len(self._in_flight(pool)[0])

    # -- reading ------------------------------------------------------------------------------------

    def _target(self, pool: PoolPolicy) -> _Target:
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
        return _Target(project=project, service=compose.service)

    def _list(self, target: _Target) -> list[Replica]:
        filters = {"label": [f"{PROJECT_LABEL}={target.project}", f"{SERVICE_LABEL}={target.service}"]}
        summaries = self._docker.call(
            f"list the containers of {target}", lambda c: c.api.containers(all=True, filters=filters)
        )
        replicas = [Replica.from_summary(s) for s in summaries]
        return [r for r in replicas if r.labels.get(ONEOFF_LABEL, "False") != "True"]

    def _replicas(self, pool: PoolPolicy, target: _Target) -> list[Replica]:
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
        with self._lock:
            draining = {cid for cid, (owner, _) in self._draining.items() if owner == pool.name}
            return draining, self._starting.get(pool.name, 0)

    def _detect_own_project(self) -> str | None:
        # Best-effort: the controller running as a Compose service manages its own project by default.
        if not self._own_project_known:
            hostname = socket.gethostname()
            for candidate in [hostname, *_container_ids_from_mounts()]:
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

    # -- status side work ---------------------------------------------------------------------------

    def _repair_leftovers(self, target: _Target, replicas: list[Replica]) -> list[Replica]:
        """Remove our own clones created but never started (a crashed scale-up); return the young ones."""
        now = time.time()
        pending: list[Replica] = []
        for replica in replicas:
            if replica.state != "created":
                continue
            if now - replica.created < self._created_grace:
                pending.append(replica)  # may be a start under way, ours or Compose's
            elif replica.labels.get(CLONE_LABEL) == "true" and not self._read_only:
                logger.warning("{}: removing {} (created {:.0f}s ago, never started)", target, replica.name,
                               now - replica.created)
                self._discard(replica.id, replica.name)
        return pending

    def _remove_stopped_victims(self, pool: PoolPolicy, target: _Target, replicas: list[Replica]) -> None:
        """Remove our clones that stopped cleanly (exit 0: a warm shutdown) and that no drain will remove: the
        victims of a controller that died between their stop and their removal. At zero replicas the newest
        is kept, as the template a scale-up clones."""
        if self._read_only:
            return
        draining, _ = self._in_flight(pool)
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

    def _note_problems(self, pool: PoolPolicy, replicas: list[Replica]) -> ReplicaProblems:
        draining, _ = self._in_flight(pool)
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
            info = self._inspect(replica.id, what=f"container {replica.name}")
        except DockerNotFoundError:
            return "clean"
        state = info.get("State") or {}
        if state.get("OOMKilled"):
            return "oom-killed"
        # Exit 0 is a replica stopped on purpose (ours or an operator's `docker stop`), not a failure.
        return "exited" if state.get("ExitCode", replica.exit_code) else "clean"

    def _current_template(self, target: _Target, replicas: list[Replica]) -> dict[str, Any] | None:
        """The newest replica's inspect, running ones first (cached per target): what a clone copies."""
        if not replicas:
            return None
        newest = max(replicas, key=lambda r: (r.state == "running", *r.newest_first_key()))
        cached = self._seen_templates.get(target)
        if cached is not None and cached.get("Id") == newest.id:
            return cached
        try:
            template = self._inspect(newest.id, what=f"container {newest.name}")
        except DockerNotFoundError:
            return None  # removed since the listing: the next tick lists again
        self._seen_templates[target] = template
        return template

    def _inspect(self, container: str, *, what: str) -> dict[str, Any]:
        info: dict[str, Any] = self._docker.call(
            f"inspect {what}", lambda c: c.api.inspect_container(container)
        )
        return info

    # -- scaling up ---------------------------------------------------------------------------------

    def _scale_up(self, pool: PoolPolicy, target: _Target, replicas: list[Replica], *, count: int) -> None:
        template = self._template_for(pool, target, replicas)
        image = self._image_for(template)
        separator = _name_separator(template, target)
        clones = [
            self._plan_clone(template, pool=pool, target=target, number=n, separator=separator, image=image)
            for n in _next_numbers(replicas, count=count)
        ]
        self._track_starting(pool, len(clones))
        try:
            futures = [self._starter.submit(self._create_and_start, target, clone) for clone in clones]
            wait(futures)
        finally:
            self._track_starting(pool, -len(clones))
        self._backoff.started(pool.name, [f.result() for f in futures if f.exception() is None], self._clock())
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise BackendError(
                f"{target}: started {len(clones) - len(errors)} of {len(clones)} new replicas; "
                f"{len(errors)} failed (and were removed): {errors[0]}"
            )

    def _template_for(self, pool: PoolPolicy, target: _Target, replicas: list[Replica]) -> dict[str, Any]:
        template = self._current_template(target, replicas)
        if template is None:
            raise TargetNotFoundError(_nothing_to_clone(target, pool))
        return template

    def _image_for(self, template: dict[str, Any]) -> str:
        """The template's image by name if the tag still points at it, else by id: clones stay identical."""
        name, image_id = str(template["Config"]["Image"]), str(template.get("Image", ""))
        try:
            current = self._docker.call(f"inspect image {name}", lambda c: untyped_api(c).inspect_image(name))
        except DockerNotFoundError:
            current = {}
        if not image_id or current.get("Id") == image_id:
            return name
        logger.warning("image {} has moved since the template replica was created; cloning with {} "
                       "(run `docker compose up -d` to roll out the new image)", name, image_id[:19])
        return image_id

    def _plan_clone(
        self,
        template: dict[str, Any],
        *,
        pool: PoolPolicy,
        target: _Target,
        number: int,
        separator: str,
        image: str,
    ) -> _Clone:
        name = separator.join((target.project, target.service, str(number)))
        primary, others = _endpoints(template, name=name)
        config = clone_config(template, pool=pool.name, number=number, image=image)
        return _Clone(name=name, config=config, primary=primary, others=others)

    def _create_and_start(self, target: _Target, clone: _Clone) -> str:
        created = self._docker.call(
            f"create container {clone.name} for {target}",
            lambda c: untyped_api(c).create_container_from_config(_with_network(c, clone), name=clone.name),
            retry=False,
        )
        container_id = str(created["Id"])
        try:
            for endpoint in clone.others:
                self._connect(container_id, clone.name, endpoint)
            self._docker.call(
                f"start container {clone.name}", lambda c: c.api.start(container_id), retry=False
            )
        except BackendError:
            self._discard(container_id, clone.name)
            raise
        logger.debug("{}: started {} ({})", target, clone.name, container_id[:12])
        return container_id

    def _connect(self, container_id: str, name: str, endpoint: _Endpoint) -> None:
        def connect(client: docker.DockerClient) -> None:
            client.api.connect_container_to_network(
                container_id, endpoint.network, aliases=list(endpoint.aliases) or None,
                links=list(endpoint.links) or None, driver_opt=endpoint.driver_opts,
            )

        self._docker.call(f"connect {name} to network {endpoint.network}", connect, retry=False)

    def _track_starting(self, pool: PoolPolicy, delta: int) -> None:
        with self._lock:
            self._starting[pool.name] = self._starting.get(pool.name, 0) + delta

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
        self, pool: PoolPolicy, target: _Target, replicas: list[Replica], live: list[Replica], *, count: int
    ) -> None:
        busy = self._busy(pool)
        victims = choose_victims(live, count=count, busy=busy)
        grace = math.ceil(pool.stop_timeout)
        # To zero: the last container of the service is stopped but kept, as the template a later scale-up
        # clones (Docker stays the only source of a container's configuration).
        chosen = {v.id for v in victims}
        keep = victims[-1].id if victims and all(r.id in chosen for r in replicas) else None
        self._start_drains(pool, target, victims, grace=grace, keep=keep)
        logger.debug(
            "{}: stopping {} (grace {}s; busy workers: {})",
            target, [v.name for v in victims], grace, "unknown" if busy is None else len(busy),
        )

    def _start_drains(
        self, pool: PoolPolicy, target: _Target, victims: Sequence[Replica], *, grace: int, keep: str | None
    ) -> None:
        deadline = self._clock() + grace
        with self._lock:
            for victim in victims:
                if victim.id in self._draining:
                    continue
                self._deadlines[victim.id] = deadline
                future = self._stopper.submit(self._drain, target, victim, grace, keep=victim.id == keep)
                self._draining[victim.id] = (pool.name, future)

    def drain_marks(self, pool: PoolPolicy) -> tuple[tuple[str, float], ...]:
        now = self._clock()
        with self._lock:
            return tuple(
                (cid, self._deadlines.get(cid, now)) for cid, (owner, _) in self._draining.items() if owner == pool.name
            )

    def resume_drains(self, pool: PoolPolicy, marks: tuple[tuple[str, float], ...]) -> None:
        if not marks or self._read_only:
            return
        target = self._target(pool)
        replicas = {r.id: r for r in self._replicas(pool, target)}  # only the target's own containers
        now = self._clock()
        # Marks come from Redis, which any broker client can write: act only on this target's replicas, and
        # never wait longer than the pool's own grace.
        ours = [(replicas[cid], deadline) for cid, deadline in marks if cid in replicas]
        ignored = [cid[:12] for cid, _ in marks if cid not in replicas]
        if ignored:
            logger.info("{}: {} draining mark(s) name no replica of it (gone, or not its own): {}", target,
                        len(ignored), ", ".join(ignored[:5]))
        if not ours:
            return
        # The same rule as a scale-down to zero: if nothing else would be left, keep the newest as the template.
        keep = None
        if len(ours) == len(replicas):
            keep = max((r for r, _ in ours), key=lambda r: r.newest_first_key()).id
        for replica, deadline in ours:
            grace = math.ceil(min(max(deadline - now, 1.0), pool.stop_timeout))
            logger.info("{}: resuming the drain of {} (begun by an earlier controller; {}s of grace left)",
                        target, replica.name, grace)
            self._start_drains(pool, target, [replica], grace=grace, keep=keep)

    def _busy(self, pool: PoolPolicy) -> set[str] | None:
        if self._busy_probe is None:
            return None
        try:
            return self._busy_probe(pool)
        except Exception as exc:  # a probe failure must never stop a scale-down
            logger.warning("pool {}: busy-worker probe failed ({}); choosing victims by age", pool.name, exc)
            return None

    def _drain(self, target: _Target, victim: Replica, grace: int, *, keep: bool = False) -> None:
        started = time.monotonic()
        try:
            self._docker.call(f"stop container {victim.name}", lambda c: c.api.stop(victim.id, timeout=grace))
            if keep:
                logger.info("{}: stopped {} in {:.1f}s and kept it: at zero replicas it is the template a "
                            "scale-up clones", target, victim.name, time.monotonic() - started)
                return
            # v=True: a worker's anonymous volumes die with it, as with `docker compose down -v`.
            self._docker.call(
                f"remove container {victim.name}", lambda c: c.api.remove_container(victim.id, v=True)
            )
            logger.info(
                "{}: stopped and removed {} in {:.1f}s", target, victim.name, time.monotonic() - started
            )
        except DockerNotFoundError:
            logger.info("{}: {} was already gone", target, victim.name)
        except BackendError as exc:
            logger.error("{}: could not stop {}: {}", target, victim.name, exc)
        finally:
            with self._lock:
                self._draining.pop(victim.id, None)
                self._deadlines.pop(victim.id, None)


def _nothing_to_clone(target: _Target, pool: PoolPolicy) -> str:
    return (
        f"{target} has no container (running or stopped) for pool {pool.name} to clone: run "
        f"`docker compose -p {target.project} up -d {target.service}` once (the autoscaler keeps one "
        "stopped replica when it scales to zero, so this only happens if that one was removed)"
    )


def _with_network(client: docker.DockerClient, clone: _Clone) -> dict[str, Any]:
    if clone.primary is None:
        return clone.config
    endpoint = clone.primary
    networking = untyped_api(client).create_networking_config(
        {
            endpoint.network: client.api.create_endpoint_config(
                aliases=list(endpoint.aliases) or None, links=list(endpoint.links) or None,
                driver_opt=endpoint.driver_opts,
            )
        }
    )
    return {**clone.config, "NetworkingConfig": networking}


def _next_numbers(replicas: Iterable[Replica], *, count: int) -> list[int]:
    highest = max((r.number for r in replicas), default=0)
    return list(range(highest + 1, highest + 1 + count))


def _container_ids_from_mounts() -> list[str]:
    # With a custom hostname the id still shows in the paths Docker bind-mounts (/etc/hostname...).
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    return list(dict.fromkeys(_CONTAINER_ID_IN_MOUNTS.findall(text)))


def _detail(
    *, running: int, unhealthy_yet: int, starting: int, draining: int, problems: ReplicaProblems
) -> str:
    parts = [f"{running} running" + (f" ({unhealthy_yet} not healthy yet)" if unhealthy_yet else "")]
    if starting:
        parts.append(f"{starting} starting")
    if draining:
        parts.append(f"{draining} draining")
    if problems.total:
        parts.append(problems.describe())
    return ", ".join(parts)
