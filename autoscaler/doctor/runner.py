"""`autoscaler doctor`: read everything once (broker, engine, workers, PostgreSQL), then judge it.

The reading is the only part that talks to anything, and only reads; each source that cannot be read
becomes one UNKNOWN finding (exit 2 unless something FAILed), and the checks that need it are skipped.
Memory sampling (seconds) runs while the workers answer the inspect broadcasts, so a run takes about
max(memory window, 3 x the inspect timeout) plus the reads.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from autoscaler.backends.compose_model import normalize_project
from autoscaler.doctor.broker import broker_findings, read_broker
from autoscaler.doctor.containers import ContainerFacts, EngineReader
from autoscaler.doctor.drift import drift_findings, eager_env_findings
from autoscaler.doctor.findings import CannotCheckError, Finding, Status
from autoscaler.doctor.memory import memory_findings
from autoscaler.doctor.networking import address_findings
from autoscaler.doctor.postgres import postgres_findings, read_postgres
from autoscaler.doctor.redact import printable, redact_url, safe_error
from autoscaler.doctor.routing import eager_worker_findings, pool_worker_map, prefetch_findings, routing_findings
from autoscaler.doctor.workers import WorkerFacts, read_workers
from autoscaler.policy.model import Policy
from autoscaler.sources.base import SourceError
from autoscaler.sources.celery_redis import CeleryRedisSource
from autoscaler.types import QueueStats

__all__ = ["DoctorOptions", "declared_queues", "run_doctor"]

_BINDING_SEP = "\x06\x16"
MAX_BINDING_KEYS = 500
MAX_SCAN_CALLS = 200
MAX_QUEUES = 1000


@dataclass(frozen=True)
class DoctorOptions:
    policy: Policy
    redis_url: str
    docker_host: str | None = None
    compose_project: str | None = None
    database_url: str | None = None
    web_services: tuple[str, ...] = ("web",)
    web_connections: int = 0
    connections_per_process: int = 1
    inspect_timeout: float = 1.0
    memory_samples: int = 3
    memory_window: float = 4.0
    unknown: tuple[Finding, ...] = ()


def declared_queues(client: redis.Redis, prefix: str = "") -> set[str]:
    """Queue names kombu declared (its `_kombu.binding.*` sets), without Celery's own pidbox/event queues.

    Bounded: at most MAX_SCAN_CALLS SCAN steps (a keyspace of millions is not walked to the end) and
    MAX_BINDING_KEYS binding sets; queues beyond are not listed (the policy's queues always are)."""
    keys: list[Any] = []
    cursor: Any = 0
    for _ in range(MAX_SCAN_CALLS):
        cursor, batch = cast("tuple[Any, list[Any]]",
                             client.scan(cursor=cursor, match=f"{prefix}_kombu.binding.*", count=1000))
        keys.extend(batch)
        if not cursor or len(keys) >= MAX_BINDING_KEYS:
            break
    found: set[str] = set()
    for key in keys[:MAX_BINDING_KEYS]:
        try:
            members = list(itertools.islice(client.sscan_iter(key, count=1000), MAX_QUEUES))
        except redis.ResponseError:
            continue  # not a set: someone else's key
        for member in members:
            text = member.decode("utf-8", "replace") if isinstance(member, bytes) else str(member)
            queue = text.split(_BINDING_SEP)[-1]
            if queue and "pidbox" not in queue and not queue.startswith("celeryev"):
                found.add(printable(queue, 200))
    return found


def _unknown(area: str, what: str, exc: Exception) -> Finding:
    return Finding(area, what, Status.UNKNOWN, safe_error(exc, 400), "the doctor cannot vouch for what it cannot read",
                   "make it reachable from where the doctor runs, or run the doctor beside the stack")


def _containers(options: DoctorOptions, engine: EngineReader, findings: list[Finding]
                ) -> tuple[dict[str, list[ContainerFacts]], list[ContainerFacts], list[ContainerFacts]]:
    pools: dict[str, list[ContainerFacts]] = {}
    everyone: dict[str, ContainerFacts] = {}
    web: list[ContainerFacts] = []
    listed: dict[str, list[ContainerFacts]] = {}
    own_project: str | None = None
    for pool in options.policy.pools:
        if pool.target.compose is None:
            findings.append(Finding("environment", "containers", Status.WARN,
                                    "a Swarm pool: the doctor reads Compose containers only (not checked)",
                                    subject=f"pool {pool.name}"))
            continue
        raw = pool.target.compose.project or options.compose_project
        if not raw:
            # As the controller does: run as a service of the project, the doctor checks its own project.
            own_project = own_project or engine.own_project()
            raw = own_project
        if not raw:
            findings.append(Finding("environment", "containers", Status.UNKNOWN,
                                    "no Compose project: set target.compose.project or AUTOSCALER_COMPOSE_PROJECT "
                                    "(or run the doctor as a service of the project)", subject=f"pool {pool.name}"))
            continue
        project = normalize_project(raw)
        if project not in listed:
            try:
                listed[project], cut = engine.project_containers(project)
            except CannotCheckError as exc:
                findings.append(_unknown("environment", "containers", exc))
                listed[project] = []
                continue
            if cut:
                findings.append(Finding("environment", "containers", Status.WARN,
                                        f"project {project} has more containers than the doctor reads"))
            everyone.update({c.id: c for c in listed[project]})
            web.extend(c for c in listed[project] if c.service in options.web_services)
        pools[pool.name] = [c for c in listed[project] if c.service == pool.target.compose.service]
        if not pools[pool.name]:
            findings.append(Finding("environment", "containers", Status.WARN,
                                    f"no container of service {pool.target.compose.service} in project {project}",
                                    subject=f"pool {pool.name}"))
    return pools, list(everyone.values()), web


@dataclass
class _Readings:
    """What was read; a source that could not be read stays empty and its checks are skipped."""

    findings: list[Finding]
    client: redis.Redis | None = None
    engine: EngineReader | None = None
    pools: dict[str, list[ContainerFacts]] = field(default_factory=dict)
    everyone: list[ContainerFacts] = field(default_factory=list)
    web: list[ContainerFacts] = field(default_factory=list)
    samples: dict[str, list[int]] = field(default_factory=dict)
    workers: dict[str, WorkerFacts] | None = None  # None: the workers could not be asked
    queues: dict[str, QueueStats] = field(default_factory=dict)


def _read_broker(options: DoctorOptions, got: _Readings) -> None:
    try:
        got.client = redis.Redis.from_url(options.redis_url, socket_timeout=3, socket_connect_timeout=3)
        got.findings.extend(broker_findings(read_broker(got.client, options.redis_url)))
    except CannotCheckError as exc:
        got.findings.append(_unknown("broker", "broker", exc))
        got.client = None
    except (ValueError, redis.RedisError) as exc:
        got.findings.append(_unknown("broker", "broker", CannotCheckError(
            f"cannot use the broker URL {redact_url(options.redis_url)}: {safe_error(exc)}")))
        got.client = None


def _read_engine(options: DoctorOptions, got: _Readings) -> threading.Thread | None:
    """Containers now; memory samples in a thread (joined by the caller) while the workers are asked."""
    try:
        got.engine = EngineReader(options.docker_host)
        got.pools, got.everyone, got.web = _containers(options, got.engine, got.findings)
    except CannotCheckError as exc:
        got.findings.append(_unknown("environment", "docker engine", exc))
        return None
    running = [c for cs in got.pools.values() for c in cs if c.running]
    if not running:
        return None
    interval = options.memory_window / max(1, options.memory_samples - 1)
    engine = got.engine

    def sample() -> None:
        got.samples.update(engine.memory_samples(running, samples=options.memory_samples, interval=interval))

    sampler = threading.Thread(target=sample, name="doctor-memory", daemon=True)
    sampler.start()
    return sampler


def _read_workers_and_queues(options: DoctorOptions, got: _Readings) -> None:
    if got.client is None:
        return
    try:
        got.workers = read_workers(options.redis_url, timeout=options.inspect_timeout)
    except CannotCheckError as exc:
        got.findings.append(_unknown("routing", "workers", exc))
    policy = options.policy
    try:
        names = set(policy.queues) | declared_queues(got.client, policy.broker.key_prefix)
        source = CeleryRedisSource(url=options.redis_url, broker=policy.broker)
        try:
            got.queues = source.observe(sorted(names)[:MAX_QUEUES])
        finally:
            source.close()
    except (SourceError, redis.RedisError) as exc:
        got.findings.append(_unknown("routing", "queues", exc))


def _judge(options: DoctorOptions, got: _Readings) -> None:
    pools, findings = got.pools, got.findings
    workers = got.workers or {}
    if got.engine is not None:
        checked = [c for cs in pools.values() for c in cs] + got.web
        findings.extend(address_findings(checked, got.everyone))
        findings.extend(drift_findings(pools, got.web))
        findings.extend(eager_env_findings(checked))
        findings.extend(memory_findings(pools, got.samples, workers, window=options.memory_window))
    pool_workers = pool_worker_map(pools, workers)
    if got.workers is not None:
        findings.extend(eager_worker_findings(workers))
        findings.extend(routing_findings(options.policy.pools, pools, workers, got.queues))
        findings.extend(prefetch_findings(options.policy.pools, pool_workers, got.queues))
    if options.database_url:
        try:
            facts = read_postgres(options.database_url, timeout=5)
        except CannotCheckError as exc:
            findings.append(_unknown("postgres", "postgres", exc))
            return
        findings.extend(postgres_findings(facts, options.policy.pools, pools, pool_workers,
                                          web_connections=options.web_connections,
                                          per_process=options.connections_per_process))


def run_doctor(options: DoctorOptions) -> list[Finding]:
    """Every finding about the stack `options` names; never raises for what it reads."""
    got = _Readings(findings=list(options.unknown))
    _read_broker(options, got)
    sampler = _read_engine(options, got)
    try:
        _read_workers_and_queues(options, got)
    finally:
        if sampler is not None:
            sampler.join()
        if got.client is not None:
            got.client.close()
        if got.engine is not None:
            got.engine.close()
    _judge(options, got)
    return got.findings
