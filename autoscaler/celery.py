"""Celery-side helpers: the publish-time stamp (producers) and the task and worker stats (workers).

The autoscaler measures queue latency as the age of the oldest waiting message. Redis lists carry no
timestamps, so producers must stamp one. One line in the Celery app module installs it::

    import autoscaler.celery
    autoscaler.celery.install()

Messages published before the helper was installed carry no stamp; the metric source then reports the
latency of that queue as unknown rather than zero.

Workers can also report, through the broker they already use, what the alerts and dashboards need and
the queues cannot say (``install_worker_stats(app)``, in the same module):

* per queue, tasks that succeeded and failed, by task name: one HINCRBY on a small hash per finished task
  (``task_success`` / ``task_failure`` signals, in the process that ran the task);
* per queue, a heartbeat per worker with its container's working set and memory limit (cgroup files: no
  Docker call), written every `interval` seconds from the worker's main loop, deleted at a clean stop.

The autoscaler reads both in one script per tick (``sources/broker_stats.py``) and treats them as hostile
input: any broker client can write these keys. A Redis error here never fails a task or stops a worker.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from celery.signals import before_task_publish, task_failure, task_success

__all__ = [
    "PUBLISHED_AT_HEADER",
    "TASKS_KEY",
    "WORKERS_KEY",
    "WorkerStats",
    "container_memory",
    "install",
    "install_worker_stats",
    "stamp_headers",
]

# The same name is read by the metric source's Lua script (sources/celery_redis.lua).
PUBLISHED_AT_HEADER = "x-autoscaler-published-at"
# Hashes in the broker (kombu's global_keyprefix in front), one of each per queue. Fields of TASKS_KEY are
# "succeeded:<task name>" and "failed:<task name>" with counts; fields of WORKERS_KEY are worker host names
# with "<unix time> <interval s> <memory bytes or -> <limit bytes or ->".
TASKS_KEY = "_autoscaler:tasks:{queue}"
WORKERS_KEY = "_autoscaler:workers:{queue}"
TASK_STATES = ("succeeded", "failed")
# A heartbeat older than this at a worker's start is a worker that died without cleaning up: deleted then.
STALE_BEAT_S = 3600.0

_installed = False
_signals_connected = False
_APP_ATTRIBUTE = "_autoscaler_worker_stats"


def stamp_headers(headers: dict[str, Any] | None, now: float | None = None) -> None:
    """Stamp the time this message enters the queue.

    Always overwritten: a retry or a re-publish is a new wait in the queue, and a stamp copied from the
    first attempt would report its countdown as backlog age.
    """
    if headers is None:
        return
    headers[PUBLISHED_AT_HEADER] = time.time() if now is None else now


def _on_before_task_publish(*, headers: dict[str, Any] | None = None, **_: Any) -> None:
    stamp_headers(headers)


def install() -> None:
    """Connect the stamping handler to Celery's ``before_task_publish`` signal (idempotent)."""
    global _installed  # noqa: PLW0603 - a process-wide, install-once switch is the point
    if _installed:
        return
    before_task_publish.connect(_on_before_task_publish, weak=False)
    _installed = True


def container_memory(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> (
    tuple[int | None, int | None]
):
    """(working set bytes, limit or None) of this process's memory cgroup: the container's, in a container.

    What Docker's memory limit and the OOM killer judge, for all the worker's pool processes at once. The
    working set is usage minus the inactive page cache (what `docker stats` and cAdvisor's
    container_memory_working_set_bytes show): a worker that reads big files is not leaking. Read from
    cgroup v2 (memory.current, memory.stat, memory.max) or v1 (memory.usage_in_bytes, memory.stat,
    memory.limit_in_bytes). (None, None) when neither is readable.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    v2 = next((line[3:] for line in lines if line.startswith("0::")), None)
    candidates = []
    if v2 is not None:
        for base in (root / v2.lstrip("/"), root):
            candidates.append((base / "memory.current", base / "memory.max", "inactive_file"))
    v1 = root / "memory"
    candidates.append((v1 / "memory.usage_in_bytes", v1 / "memory.limit_in_bytes", "total_inactive_file"))
    for used_file, limit_file, inactive_key in candidates:
        used = _read_int(used_file)
        if used is not None:
            inactive = _stat_value(used_file.parent / "memory.stat", inactive_key)
            limit = _read_int(limit_file)
            # cgroup v1 says "no limit" with a huge number (a page-rounded 2**63 - 1).
            return max(0, used - inactive), limit if limit is not None and limit < 1 << 60 else None
    return None, None


def _stat_value(path: Path, key: str) -> int:
    try:
        text = path.read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class WorkerStats:
    """The worker-side writer: task counts and heartbeats into the broker (Redis transport only)."""

    def __init__(self, app: Any, *, interval: float = 10.0, hostname: str | None = None) -> None:
        self.app = app
        self.interval = interval
        self.hostname = hostname
        options = app.conf.broker_transport_options or {}
        self.prefix = str(options.get("global_keyprefix", "") or "")
        self._client: Any = None
        self._pid = 0
        self.errors = 0  # Redis errors swallowed (the stats are best effort; the task's outcome is not)

    def client(self) -> Any:
        # Prefork children inherit the parent's objects: a connection is never shared across processes.
        if self._client is None or self._pid != os.getpid():
            import redis  # noqa: PLC0415 - only workers that install the stats need it

            url = str(self.app.conf.broker_url or "")
            if not url.startswith(("redis://", "rediss://", "unix://")):
                return None
            self._client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
            self._pid = os.getpid()
        return self._client

    def count(self, queue: str, state: str, task_name: str) -> None:
        """One finished task: +1 on "<state>:<task name>" of the queue's hash."""
        self._call(lambda c: c.hincrby(self.prefix + TASKS_KEY.format(queue=queue), f"{state}:{task_name}", 1))

    def beat(self, queues: list[str], now: float | None = None) -> None:
        used, limit = container_memory()
        at = time.time() if now is None else now
        value = f"{at:.3f} {self.interval:g} {'-' if used is None else used} {'-' if limit is None else limit}"
        host = self.hostname or socket.gethostname()

        def write(c: Any) -> None:
            pipe = c.pipeline(transaction=False)
            for queue in queues:
                pipe.hset(self.prefix + WORKERS_KEY.format(queue=queue), host, value)
            pipe.execute()

        self._call(write)

    def forget(self, queues: list[str]) -> None:
        host = self.hostname or socket.gethostname()

        def delete(c: Any) -> None:
            pipe = c.pipeline(transaction=False)
            for queue in queues:
                pipe.hdel(self.prefix + WORKERS_KEY.format(queue=queue), host)
            pipe.execute()

        self._call(delete)

    def prune(self, queues: list[str], now: float | None = None, *, scan: int = 1000) -> None:
        """Delete heartbeats older than STALE_BEAT_S, or unreadable (workers that died without a clean stop)."""
        cutoff = (time.time() if now is None else now) - STALE_BEAT_S

        def sweep(c: Any) -> None:
            for queue in queues:
                key = self.prefix + WORKERS_KEY.format(queue=queue)
                _, page = c.hscan(key, 0, count=scan)
                old = [field for field, value in page.items() if _beat_time(value) < cutoff]
                if old:
                    c.hdel(key, *old)

        self._call(sweep)

    def _call(self, action: Any) -> None:
        import redis  # noqa: PLC0415

        try:
            client = self.client()
            if client is not None:
                action(client)
        except (redis.RedisError, OSError, ValueError):
            self.errors += 1


def _beat_time(value: bytes) -> float:
    try:
        return float(value.split(b" ", 1)[0])
    except ValueError:
        return float("-inf")


def _queue_of(sender: Any) -> str | None:
    request = getattr(sender, "request", None)
    if getattr(request, "is_eager", False):
        return None  # run in the caller's process (tests, eager mode): no queue, no worker
    info = getattr(request, "delivery_info", None) or {}
    queue = info.get("routing_key") if isinstance(info, dict) else None
    return queue if isinstance(queue, str) and queue else None


def _on_task_done(state: str) -> Any:
    def handler(sender: Any = None, **_: Any) -> None:
        stats = getattr(getattr(sender, "app", None), _APP_ATTRIBUTE, None)
        queue = _queue_of(sender)
        if isinstance(stats, WorkerStats) and queue is not None and getattr(sender, "name", None):
            stats.count(queue, state, str(sender.name))

    return handler


_on_success = _on_task_done("succeeded")
_on_failure = _on_task_done("failed")


def install_worker_stats(app: Any, *, interval: float = 10.0) -> WorkerStats:
    """Count finished tasks per queue and beat every `interval` s with the container's memory (idempotent).

    Call it in the Celery app module, before the worker starts: it adds a consumer bootstep (the beat runs
    while the worker is connected to the broker) and connects ``task_success`` and ``task_failure``.
    The queue of a task is its delivery routing key: the queue's name under Celery's default routing.
    """
    global _signals_connected  # noqa: PLW0603 - the handlers are connected once per process, for every app
    existing = getattr(app, _APP_ATTRIBUTE, None)
    if isinstance(existing, WorkerStats):
        return existing
    from celery import bootsteps  # noqa: PLC0415

    stats = WorkerStats(app, interval=interval)

    class WorkerHeartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
        requires = frozenset({"celery.worker.consumer.connection:Connection"})

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.tref: Any = None
            self.queues: list[str] = []

        def start(self, parent: Any) -> None:
            # celery-exporter's hostname label: the node name's host part ("celery@abc123" -> "abc123").
            stats.hostname = str(getattr(parent, "hostname", "") or "").rpartition("@")[2] or None
            self.queues = sorted(q.name for q in parent.app.amqp.queues.consume_from.values())
            stats.prune(self.queues)
            stats.beat(self.queues)
            self.tref = parent.timer.call_repeatedly(stats.interval, stats.beat, (self.queues,), priority=10)

        def stop(self, parent: Any) -> None:  # noqa: ARG002 - bootstep signature
            if self.tref is not None:
                self.tref.cancel()
                self.tref = None
                stats.forget(self.queues)

        def shutdown(self, parent: Any) -> None:
            self.stop(parent)

    app.steps["consumer"].add(WorkerHeartbeat)
    setattr(app, _APP_ATTRIBUTE, stats)
    if not _signals_connected:
        task_success.connect(_on_success, weak=False)
        task_failure.connect(_on_failure, weak=False)
        _signals_connected = True
    return stats
