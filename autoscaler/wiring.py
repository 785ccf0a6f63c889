"""Builds the running controller from settings: the one place that knows every concrete part."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis
from loguru import logger

from autoscaler.backends.base import Backend, BackendError, TargetStatus
from autoscaler.gate import gate
from autoscaler.inflight import ActionsInFlight
from autoscaler.leader import Fence, LeaderLock
from autoscaler.loop import Controller, run_forever
from autoscaler.observability.http import HealthServer
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.decide import decide
from autoscaler.policy.model import Policy
from autoscaler.policy.watch import PolicyWatcher
from autoscaler.record import TraceRecorder
from autoscaler.settings import Settings, SettingsError
from autoscaler.sources.base import SourceError
from autoscaler.sources.broker_stats import RedisBrokerStats
from autoscaler.sources.celery_redis import DEFAULT_TIMEOUT_S, CeleryRedisSource, redact_url
from autoscaler.state_store import RedisStateStore, StateStoreError
from autoscaler.types import Observation, PoolState, QueueStats

__all__ = ["App", "build_backend", "build_controller", "lease_problems", "lease_ttl", "preview"]

# Expiry of the leader lock in intervals: the leader renews every interval, a standby polls every quarter
# interval, so a standby takes over within 1.75 intervals of the leader's last renewal.
LEADER_TTL_INTERVALS = 1.5
STATUS_DOCKER_RETRY_BUDGET = 2.0


@dataclass
class App:
    controller: Controller
    settings: Settings
    watcher: PolicyWatcher
    recorder: TraceRecorder | None

    def interval(self) -> float:
        return self.settings.interval or self.watcher.policy.interval

    def run(self, *, stop: threading.Event, reload: threading.Event, wake: threading.Event, once: bool) -> None:
        server = None
        if self.settings.metrics_port and not once:
            server = HealthServer(
                host=self.settings.metrics_host,
                port=self.settings.metrics_port,
                metrics=self.controller.metrics,
                readiness=lambda: self.controller.readiness(self.interval()),
            )
            server.start()
            logger.info("metrics and health on {}:{}", self.settings.metrics_host, server.port)
        policy = self.watcher.policy
        dry_run = self.controller.dry_run if self.controller.dry_run is not None else policy.dry_run
        logger.info(
            "controller {} starting: {} pools, interval {}s{}",
            self.settings.instance_id,
            len(policy.pools),
            self.interval(),
            ", DRY-RUN" if dry_run else "",
        )
        # The queue watcher's own connection to the broker: its probes run beside the loop's reads.
        watch_client = redis.Redis.from_url(self.settings.redis_url, socket_timeout=1, socket_connect_timeout=1)
        try:
            run_forever(
                self.controller,
                interval=self.interval,
                stop=stop,
                reload=reload,
                wake=wake,
                once=once,
                on_tick=self.recorder.write if self.recorder else None,
                watch_client=watch_client,
            )
        finally:
            watch_client.close()
            if server is not None:
                server.stop()
            if self.recorder is not None:
                self.recorder.close()
            self.controller.source.close()
            if self.controller.stats is not None:
                self.controller.stats.close()
            self.controller.backend.close()


def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3, health_check_interval=30)


def build_backend(
    settings: Settings,
    metrics: Metrics | None = None,
    *,
    docker_retry_budget: float | None = None,
    read_only: bool = False,
    fence: Fence | None = None,
) -> Backend:
    """The Docker backends (Compose and Swarm) behind one router, sharing one lazy Engine API client."""
    # docker-py and Celery's control client are only needed here, not by validate/schema/simulate.
    from autoscaler.backends.celery_busy import CeleryBusyProbe  # noqa: PLC0415
    from autoscaler.backends.compose import ComposeBackend  # noqa: PLC0415
    from autoscaler.backends.compose_standby import CeleryStandbyControl  # noqa: PLC0415
    from autoscaler.backends.docker_client import DockerConnection  # noqa: PLC0415
    from autoscaler.backends.router import BackendRouter  # noqa: PLC0415
    from autoscaler.backends.swarm import SwarmBackend  # noqa: PLC0415

    check = fence.check if fence is not None else None
    connection = (
        DockerConnection(base_url=settings.docker_host, fence=check)
        if docker_retry_budget is None
        else DockerConnection(base_url=settings.docker_host, retry_budget=docker_retry_budget, fence=check)
    )

    def on_replica_failure(pool: str, reason: str) -> None:
        if metrics is not None:
            metrics.replica_failures.labels(pool, reason).inc()

    # One Celery client for both: which workers are busy (Compose victims), and warm shutdowns (Swarm drains).
    celery_control = CeleryBusyProbe(broker_url=settings.redis_url, timeout=settings.busy_probe_timeout)
    compose = ComposeBackend(
        docker_connection=connection,
        default_project=settings.compose_project,
        busy_probe=celery_control,
        on_replica_failure=on_replica_failure,
        read_only=read_only,
        # Warm standbys: activated and returned by remote control addressed to one worker, replies awaited.
        standby_control=CeleryStandbyControl(broker_url=settings.redis_url),
        on_standby=metrics.observe_standbys if metrics is not None else None,
    )
    swarm = SwarmBackend(docker_connection=connection, control=None if read_only else celery_control,
                         lease_term=fence.term if fence is not None else None)
    return BackendRouter(compose=compose, swarm=swarm)


def forget_legacy_templates(client: redis.Redis, *, prefix: str) -> int:
    """Delete the container templates that versions before 0.2 kept in Redis; how many were deleted.

    They were full `docker inspect`s, worker environments (database password, secret key) included, in the
    broker that every web and worker container can read. Nothing reads them any more; a Redis that cannot
    be reached now is left for the next start.
    """
    deleted = 0
    try:
        for key in client.scan_iter(match=f"{prefix}template:*", count=500):
            deleted += int(cast(int, client.delete(key)))
    except redis.RedisError as exc:
        logger.warning("could not delete old container templates from Redis ({}); will try at the next start", exc)
        return deleted
    if deleted:
        logger.info("deleted {} container template(s) that an earlier version kept in Redis", deleted)
    return deleted


def lease_ttl(settings: Settings, policy: Policy) -> float:
    """The leader lock's expiry: AUTOSCALER_LEADER_TTL, else 1.5 of the interval in force."""
    return settings.leader_ttl or LEADER_TTL_INTERVALS * (settings.interval or policy.interval)


def lease_problems(settings: Settings, policy: Policy) -> list[str]:
    """Why this policy's interval cannot go with an explicit AUTOSCALER_LEADER_TTL (empty when it can)."""
    interval = settings.interval or policy.interval
    if settings.leader_ttl is None or settings.leader_ttl > interval:
        return []
    return [
        f"interval: {interval:g}s is not below AUTOSCALER_LEADER_TTL={settings.leader_ttl:g}s: the leader lock "
        "would expire between two renewals and two replicas would take turns leading (unset "
        "AUTOSCALER_LEADER_TTL to have it follow the interval)"
    ]


def build_controller(settings: Settings, *, record: Path | None = None) -> App:
    watcher = PolicyWatcher(settings.policy, check=lambda p: lease_problems(settings, p))
    policy = watcher.policy
    if problems := lease_problems(settings, policy):
        raise SettingsError(problems)
    state_client = _redis(settings.state_redis_url or settings.redis_url)
    # Earlier versions wrote templates where the state lived: the broker unless told otherwise. Both are
    # cleaned, so moving the state to its own Redis does not leave the old keys (and their secrets) behind.
    forget_legacy_templates(state_client, prefix=settings.state_prefix)
    if settings.state_redis_url and settings.state_redis_url != settings.redis_url:
        broker_client = _redis(settings.redis_url)
        try:
            forget_legacy_templates(broker_client, prefix=settings.state_prefix)
        finally:
            broker_client.close()
    metrics = Metrics()
    lock = LeaderLock(
        state_client,
        key=f"{settings.state_prefix}leader",
        instance_id=settings.instance_id,
        ttl=lease_ttl(settings, policy),
    )
    fence = Fence(lock)
    controller = Controller(
        policies=watcher,
        source=CeleryRedisSource(url=settings.redis_url, broker=policy.broker),
        backend=build_backend(settings, metrics, fence=fence),
        store=RedisStateStore(state_client, prefix=settings.state_prefix, lease=(lock.key, lock.instance_id)),
        metrics=metrics,
        lock=lock,
        fence=fence,
        lease_ttl=lambda p: lease_ttl(settings, p),
        dry_run=settings.dry_run,
        stats=RedisBrokerStats(CeleryRedisSource.connect(settings.redis_url, DEFAULT_TIMEOUT_S),
                               where=redact_url(settings.redis_url)),
        interval=lambda p: settings.interval or p.interval,
        actions=ActionsInFlight(),
    )
    recorder = TraceRecorder(record) if record else None
    return App(controller=controller, settings=settings, watcher=watcher, recorder=recorder)


def preview(settings: Settings, *, backend: Backend | None = None) -> dict[str, Any]:
    """What the controller would decide now, without acting or taking the lock (for `status`)."""
    import time  # noqa: PLC0415

    watcher = PolicyWatcher(settings.policy)
    policy: Policy = watcher.policy
    state_client = _redis(settings.state_redis_url or settings.redis_url)
    source = CeleryRedisSource(url=settings.redis_url, broker=policy.broker)
    metric_error: str | None = None
    try:
        queues = source.observe(policy.queues)
    except SourceError as exc:
        queues, metric_error = {}, str(exc)
    try:
        states = RedisStateStore(state_client, prefix=settings.state_prefix).load([p.name for p in policy.pools])
    except StateStoreError:
        states = {}  # Redis is down: the metric error above already says so
    if backend is None:
        try:
            # A person is waiting: a daemon that does not answer within a couple of seconds is reported.
            # Read-only: `status` reports, it never removes anything (it holds no leader lock).
            backend = build_backend(settings, docker_retry_budget=STATUS_DOCKER_RETRY_BUDGET, read_only=True)
        except BackendError as exc:
            logger.warning("no backend: {}", exc)
    now = time.time()
    pools: list[dict[str, Any]] = []
    for pool in policy.pools:
        status: TargetStatus | None = None
        backend_error: str | None = None
        state = states.get(pool.name, PoolState())
        if backend is not None:
            try:
                backend.resume_standbys(pool, state.standbys)  # which standbys are active: the state says
                status = backend.status(pool)
            except BackendError as exc:
                backend_error = str(exc)
        else:
            backend_error = "no backend"
        current = None if status is None else status.running
        stats = tuple(queues[q] for q in pool.queues if q in queues)
        observation = Observation(stats, current, metric_error=metric_error, backend_error=backend_error,
                                  draining=0 if status is None else status.draining,
                                  standby=0 if status is None else status.standby)
        # Gated as a tick is: what `status` says a pool would do is what the controller does.
        decision = gate(decide(pool, observation, state, now), status)
        pools.append(
            {
                "name": pool.name,
                "current": current,
                "standby": None if status is None else status.standby,
                "standby_memory_bytes": None if status is None else status.standby_memory,
                "desired": decision.desired,
                "reason": decision.reason,
                "queues": [_queue_json(q) for q in stats],
            }
        )
    source.close()
    if backend is not None:
        backend.close()
    return {"pools": pools, "metric_error": metric_error}


def _queue_json(q: QueueStats) -> dict[str, Any]:
    return {"name": q.name, "waiting": q.waiting, "unacked": q.unacked, "latency_s": q.latency_s}
