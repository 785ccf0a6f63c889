"""Prometheus metrics of the controller, on a registry of its own so tests can build many."""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from autoscaler.observability.celery_metrics import BrokerCollector
from autoscaler.policy.model import BrokerOptions, Policy, PoolPolicy
from autoscaler.sources.base import BrokerStatsReader, SourceError
from autoscaler.types import Decision, QueueStats, StandbyPlan

__all__ = ["Metrics", "action_kind"]

_ACTION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TICK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queue_waiting = Gauge(
            "autoscaler_queue_waiting",
            "Messages waiting in the queue (priority sub-lists included)",
            ["queue"],
            registry=r,
        )
        self.queue_unacked = Gauge(
            "autoscaler_queue_unacked",
            "Messages delivered to workers and not yet acknowledged",
            ["queue"],
            registry=r,
        )
        self.queue_latency = Gauge(
            "autoscaler_queue_latency_seconds",
            "Age of the oldest waiting message; NaN when unknown",
            ["queue"],
            registry=r,
        )
        self.pool_current = Gauge("autoscaler_pool_current_replicas", "Replicas running now", ["pool"], registry=r)
        self.pool_desired = Gauge("autoscaler_pool_desired_replicas", "Replicas decided", ["pool"], registry=r)
        self.pool_metric = Gauge("autoscaler_pool_metric", "The value the pool's strategy saw", ["pool"], registry=r)
        self.pool_unplaceable = Gauge(
            "autoscaler_pool_unplaceable_replicas",
            "Replicas the platform was asked for but cannot place (Swarm: no node with the resources)",
            ["pool"], registry=r,
        )
        self.actions = Counter(
            "autoscaler_actions",
            "Scaling actions by pool, direction and result (ok, error, dry_run)",
            ["pool", "direction", "result"],
            registry=r,
        )
        self.action_duration = Histogram(
            "autoscaler_action_duration_seconds",
            "Time a backend took to act",
            ["pool", "direction"],
            buckets=_ACTION_BUCKETS,
            registry=r,
        )
        self.tick_duration = Histogram(
            "autoscaler_tick_duration_seconds", "Time one reconcile tick took", buckets=_TICK_BUCKETS, registry=r
        )
        self.early_evaluations = Counter(
            "autoscaler_early_evaluations", "Evaluations between ticks, woken by the queue watch", registry=r
        )
        self.source_errors = Counter(
            "autoscaler_metric_source_errors", "Ticks whose metric read failed after retries", registry=r
        )
        self.backend_errors = Counter(
            "autoscaler_backend_errors", "Backend status or action failures", ["pool"], registry=r
        )
        self.pool_errors = Counter(
            "autoscaler_pool_errors",
            "Ticks in which a pool's reconcile raised an unexpected error (the pool held, the others went on)",
            ["pool"],
            registry=r,
        )
        self.replica_failures = Counter(
            "autoscaler_replica_failures",
            "Replicas found exited, OOM-killed or dead (not counted as running)",
            ["pool", "reason"],
            registry=r,
        )
        self.leader = Gauge("autoscaler_leader", "1 while this replica holds the leader lock", registry=r)
        self.last_good_tick = Gauge(
            "autoscaler_last_good_tick_timestamp_seconds",
            "When the last tick that read metrics finished",
            registry=r,
        )
        self._queue_gauges: dict[str, tuple[Gauge, Gauge, Gauge]] = {}
        self.queue_read_problems = Counter(
            "autoscaler_queue_read_problems",
            "Reads in which part of a queue was unknown, by problem: unreadable (a key of the wrong type), "
            "unacked_unknown (the unacked hash unreadable or too big per entry), latency_unknown (the oldest "
            "message too large to read, or its size not measurable)",
            ["queue", "problem"],
            registry=r,
        )
        self.pool_standby = Gauge(
            "autoscaler_pool_standby_replicas", "Warm standbys: booted, consuming none of the pool's queues",
            ["pool"], registry=r,
        )
        self.pool_standby_memory = Gauge(
            "autoscaler_pool_standby_memory_bytes",
            "Memory the pool's warm standbys may hold: the sum of their memory limits (0 when unlimited)",
            ["pool"], registry=r,
        )
        self.standby_actions = Counter(
            "autoscaler_standby_actions",
            "Warm standbys activated, returned, booted or retired, by outcome (ok, error, lease_lost, dry_run)",
            ["pool", "action", "outcome"], registry=r,
        )
        self.policy_reloads = Counter(
            "autoscaler_policy_reloads", "Policy file reloads by result (ok, invalid)", ["result"], registry=r
        )
        self._policy_gauges(r)
        self.broker_stats_errors = Counter(
            "autoscaler_broker_stats_errors", "Ticks whose broker stats read (memory, task counts) failed", registry=r
        )
        self.last_action = Gauge(
            "autoscaler_pool_last_action_timestamp_seconds",
            "When the pool's last action was taken (one series per pool: its direction, result and kind of "
            "reason; Grafana annotations use the value as the time)",
            ["pool", "direction", "result", "kind"],
            registry=r,
        )
        self._last_action_labels: dict[str, tuple[str, str, str, str]] = {}
        self.broker = BrokerCollector()
        r.register(self.broker)

    def _policy_gauges(self, r: CollectorRegistry) -> None:
        self.pool_min = Gauge("autoscaler_pool_min_replicas", "The pool's min in the policy", ["pool"], registry=r)
        self.pool_max = Gauge("autoscaler_pool_max_replicas", "The pool's max in the policy", ["pool"], registry=r)
        self.pool_queue = Gauge(
            "autoscaler_pool_queue_info", "1 for each queue a pool consumes (joins queues to pools)",
            ["pool", "queue"], registry=r,
        )
        self.interval = Gauge("autoscaler_policy_interval_seconds", "Seconds between ticks in force", registry=r)
        self._policy_seen: tuple[Policy, float] | None = None

    def set_leader(self, leader: bool) -> None:
        self.leader.set(1 if leader else 0)
        self.broker.leading = leader

    def observe_policy(self, policy: Policy, interval: float) -> None:
        """The policy's bounds, queues and interval; series of pools or queues it no longer has are removed."""
        if self._policy_seen is not None and self._policy_seen[0] is policy and self._policy_seen[1] == interval:
            return
        self._policy_seen = (policy, interval)
        for gauge in (self.pool_min, self.pool_max, self.pool_queue):
            gauge.clear()
        for pool in policy.pools:
            self.pool_min.labels(pool.name).set(pool.min)
            self.pool_max.labels(pool.name).set(pool.max)
            for queue in pool.queues:
                self.pool_queue.labels(pool.name, queue).set(1)
        self.interval.set(interval)

    def observe_broker(self, reader: BrokerStatsReader, policy: Policy, broker: BrokerOptions, now: float) -> None:
        """One broker stats read (never needed to decide: a failure leaves only these series out)."""
        try:
            stats = reader.read(policy.queues, broker)
        except SourceError as exc:
            self.broker_stats_errors.inc()
            self.broker.forget_stats(str(exc))
            return
        for queue, kind, _ in stats.problems:
            self.queue_read_problems.labels(queue, kind).inc()
        self.broker.update(stats, policy, now)

    def observe_action(self, pool: PoolPolicy, decision: Decision, result: str, now: float) -> None:
        labels = (pool.name, str(decision.direction), result, action_kind(pool, decision))
        old = self._last_action_labels.get(pool.name)
        if old is not None and old != labels:
            self.last_action.remove(*old)
        self._last_action_labels[pool.name] = labels
        self.last_action.labels(*labels).set(now)

    def observe_queues(self, queues: Iterable[QueueStats], *, partial: bool = False) -> None:
        queues = list(queues)
        self.broker.observe_queues(queues, partial=partial)
        for q in queues:
            waiting, unacked, latency = self._queue_children(q.name)
            waiting.set(math.nan if q.error else q.waiting)
            unacked.set(math.nan if q.error or q.unacked_error else q.unacked)
            latency.set(math.nan if q.latency_s is None else q.latency_s)
            if q.error or q.unacked_error or q.latency_error:
                self._count_problems(q)

    def _count_problems(self, q: QueueStats) -> None:
        for problem, why in (
            ("unreadable", q.error), ("unacked_unknown", q.unacked_error), ("latency_unknown", q.latency_error)
        ):
            if why is not None:
                self.queue_read_problems.labels(q.name, problem).inc()

    def _queue_children(self, queue: str) -> tuple[Gauge, Gauge, Gauge]:
        # labels() hashes and locks on every call; with 1,000 queues per tick that is a third of the tick.
        children = self._queue_gauges.get(queue)
        if children is None:
            children = (
                self.queue_waiting.labels(queue),
                self.queue_unacked.labels(queue),
                self.queue_latency.labels(queue),
            )
            self._queue_gauges[queue] = children
        return children

    def observe_standbys(self, pool: str, count: int, memory: int) -> None:
        self.pool_standby.labels(pool).set(count)
        self.pool_standby_memory.labels(pool).set(memory)

    def count_standby_plan(self, pool: str, plan: StandbyPlan, outcome: str) -> None:
        for action, count in (("activate", plan.activate), ("return", plan.to_standby), ("boot", plan.boot),
                              ("retire", plan.retire)):
            if count:
                self.standby_actions.labels(pool, action, outcome).inc(count)

    def observe_decision(self, decision: Decision) -> None:
        if decision.current is not None:
            self.pool_current.labels(decision.pool).set(decision.current)
        if decision.desired is not None:
            self.pool_desired.labels(decision.pool).set(decision.desired)
        self.pool_metric.labels(decision.pool).set(math.nan if decision.metric is None else decision.metric)


def action_kind(pool: PoolPolicy, decision: Decision) -> str:
    """A bounded name for why a pool was scaled (the reason itself is free text: it stays in the log)."""
    current = decision.current if decision.current is not None else 0
    if current < pool.min:
        return "below_min"
    if current > pool.max:
        return "above_max"
    if decision.details.get("repair") or "restoring" in decision.reason:
        return "restore"
    if "fallback to" in decision.reason:
        return "fallback"
    return pool.strategy
