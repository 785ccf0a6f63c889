"""The series celery-exporter's users already know, and the broker-side ones the alerts need.

Served by a collector that yields only while this replica leads: a standby's copies would be stale, and
the celery mixin's alerts (CeleryHighQueueLength, CeleryWorkerDown...) sum over every target they scrape.

* ``celery_queue_length{queue_name}``: waiting messages (priority sub-lists included), as the queue read saw;
* ``celery_task_succeeded_total`` / ``celery_task_failed_total{name, queue_name}``: the counts the workers'
  helper keeps in the broker, exported as they stand there: the autoscaler restarting or failing over does
  not reset them; a count that goes down (the hash deleted, or rewritten) is a counter reset, which
  Prometheus's rate() and increase() already handle. No ``hostname`` label: the counts are per queue, so
  the replicas a pool churns through do not each leave series behind (the mixin's alerts sum by
  queue_name and name);
* ``celery_worker_up{hostname}``: 1 while a worker's heartbeat is younger than 3 of its intervals, then 0,
  and gone 10 minutes later (celery-exporter's purge);
* ``autoscaler_worker_memory_bytes`` / ``autoscaler_worker_memory_limit_bytes{pool, hostname}``: the worker
  container's working set (cgroup usage less inactive page cache) from its heartbeat, for live workers;
* ``autoscaler_broker_memory_used_bytes`` / ``autoscaler_broker_memory_limit_bytes``: INFO memory's
  used_memory and maxmemory (0: no limit).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from loguru import logger
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from autoscaler.policy.model import Policy
from autoscaler.sources.base import BrokerStats
from autoscaler.types import QueueStats

__all__ = ["WORKER_DOWN_BEATS", "WORKER_PURGE_S", "BrokerCollector"]

WORKER_DOWN_BEATS = 3  # missed heartbeats before a worker counts as down
WORKER_PURGE_S = 600.0  # a worker down this long is no longer exported
FUTURE_SLACK_S = 300.0  # a heartbeat stamped further ahead than this is refused (a clock or a forgery)


@dataclass
class _Snapshot:
    used: int | None = None
    limit: int | None = None
    tasks: list[tuple[str, str, str, int]] = field(default_factory=list)  # state, name, queue, count
    up: dict[str, int] = field(default_factory=dict)  # hostname -> 0/1
    memory: dict[tuple[str, str], tuple[int | None, int | None]] = field(default_factory=dict)


class BrokerCollector(Collector):
    def __init__(self) -> None:
        self.leading = False
        self._lengths: dict[str, int] = {}
        self._snapshot: _Snapshot | None = None
        self._warned: set[str] = set()

    def observe_queues(self, queues: Iterable[QueueStats], *, partial: bool = False) -> None:
        """The tick's read replaces every length; a partial one (a push evaluation's) updates only its queues."""
        lengths = {q.name: q.waiting for q in queues if q.error is None}
        if partial:
            unreadable = {q.name for q in queues if q.error is not None}
            self._lengths = {k: v for k, v in self._lengths.items() if k not in unreadable} | lengths
        else:
            self._lengths = lengths

    def forget_stats(self, error: str) -> None:
        """The stats read failed: no series rather than stale ones; the failure logged once in a row."""
        self._snapshot = None
        if "read" not in self._warned:
            logger.warning("broker stats: {}; their series are left out until a read succeeds", error)
        self._warned = {"read"}

    def update(self, stats: BrokerStats, policy: Policy, now: float) -> None:
        """Take a read; each problem it had is logged once while it lasts."""
        pools_of: dict[str, list[str]] = {}
        for pool in policy.pools:
            for queue in pool.queues:
                pools_of.setdefault(queue, []).append(pool.name)
        snap = _Snapshot(used=stats.used_memory, limit=stats.maxmemory)
        for queue, counts in stats.tasks.items():
            snap.tasks += [(state, name, queue, n) for (state, name), n in counts.items()]
        problems = [sentence for _, _, sentence in stats.problems]
        for queue, beats in stats.workers.items():
            for host, beat in beats.items():
                age = now - beat.at
                if age < -FUTURE_SLACK_S:
                    problems.append(f"worker {host!r} on queue {queue!r}: heartbeat {-age:.0f}s in the future")
                    continue
                if age > WORKER_PURGE_S + WORKER_DOWN_BEATS * beat.every:
                    continue
                up = int(age <= WORKER_DOWN_BEATS * beat.every)
                snap.up[host] = max(snap.up.get(host, 0), up)
                if up:
                    for pool_name in pools_of.get(queue, ()):
                        snap.memory[(pool_name, host)] = (beat.memory, beat.limit)
        self._snapshot = snap
        for problem in problems:
            if problem not in self._warned:
                logger.warning("broker stats: {}", problem)
        self._warned = set(problems)

    def collect(self) -> Iterator[Metric]:
        if not self.leading:
            return
        length = GaugeMetricFamily("celery_queue_length", "Messages waiting in the queue (celery-exporter's name)",
                                   labels=["queue_name"])
        for queue, n in sorted(self._lengths.items()):
            length.add_metric([queue], n)
        yield length
        snap = self._snapshot
        if snap is None:
            return
        for state in ("succeeded", "failed"):
            counter = CounterMetricFamily(f"celery_task_{state}", f"Tasks that {state}, as the workers counted them",
                                          labels=["name", "queue_name"])
            for s, name, queue, n in snap.tasks:
                if s == state:
                    counter.add_metric([name, queue], n)
            yield counter
        up = GaugeMetricFamily("celery_worker_up", "1 while the worker's heartbeat is fresh", labels=["hostname"])
        for host, value in sorted(snap.up.items()):
            up.add_metric([host], value)
        yield up
        used = GaugeMetricFamily("autoscaler_worker_memory_bytes",
                                 "A worker container's working set (cgroup usage less inactive page cache)",
                                 labels=["pool", "hostname"])
        limit = GaugeMetricFamily("autoscaler_worker_memory_limit_bytes",
                                  "A worker container's memory limit (cgroup); absent when it has none",
                                  labels=["pool", "hostname"])
        for (pool, host), (memory, cap) in sorted(snap.memory.items()):
            if memory is not None:
                used.add_metric([pool, host], memory)
            if cap is not None:
                limit.add_metric([pool, host], cap)
        yield used
        yield limit
        for name, amount, doc in (
            ("autoscaler_broker_memory_used_bytes", snap.used, "The broker's used_memory (INFO memory)"),
            ("autoscaler_broker_memory_limit_bytes", snap.limit, "The broker's maxmemory (0: no limit)"),
        ):
            if amount is not None:
                yield GaugeMetricFamily(name, doc, value=amount)

