"""What the live Celery workers say about themselves, over Celery's remote control (read-only broadcasts).

Three inspect broadcasts: `active_queues` (what each worker consumes), `stats` (pool kind, concurrency,
max-tasks-per-child as the pool really runs it, whatever set it: command line or configuration) and `conf`
(the settings that differ from Celery's defaults: task_always_eager, worker_prefetch_multiplier, ...; under
a namespace when the app reads them from Django settings, CELERY_TASK_ALWAYS_EAGER).
They write only what remote control always writes: the broadcast (PUBLISH on the pidbox channel), its
binding, and the reply queue the workers answer into, which kombu deletes after reading.

`worker_facts` parses the replies: any worker can answer anything, so each field is checked and a worker
whose answer makes no sense is kept with what could be read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery import Celery

from autoscaler.doctor.findings import CannotCheckError
from autoscaler.doctor.redact import printable, redact_url, safe_error

__all__ = ["WorkerFacts", "read_workers", "setting", "worker_facts"]

MAX_WORKERS = 2000
DEFAULT_PREFETCH_MULTIPLIER = 4  # Celery's default when `conf` does not list it


@dataclass(frozen=True, slots=True)
class WorkerFacts:
    nodename: str  # celery@abc123
    host: str  # abc123: the container's hostname under the usual -n name@%h
    queues: frozenset[str] | None  # None: it did not answer active_queues
    pool: str  # "prefork", "threads", "solo", "gevent", "eventlet", or "" if unknown
    concurrency: int | None
    max_tasks_per_child: int | None  # None: unlimited or unknown
    max_memory_per_child: int | None
    prefetch_multiplier: int | None
    always_eager: bool | None  # None: conf did not answer


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _positive(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    return value if isinstance(value, int) and 0 < value < 10**9 else None


def _pool_kind(implementation: Any) -> str:
    text = printable(implementation, 120).lower() if isinstance(implementation, str) else ""
    for kind, marker in (("prefork", "prefork"), ("threads", "thread"), ("solo", "solo"), ("gevent", "gevent"),
                         ("eventlet", "eventlet")):
        if marker in text:
            return kind
    return ""


def _queues(reply: Any) -> frozenset[str] | None:
    if not isinstance(reply, list):
        return None
    return frozenset(printable(q.get("name"), 200) for q in reply[:1000]
                     if isinstance(q, dict) and isinstance(q.get("name"), str))


def setting(conf: Mapping[str, Any], name: str, *old: str) -> Any:
    """A Celery setting from a `conf` reply, under its own name, a namespaced one (Django's
    `app.config_from_object(..., namespace="CELERY")` keeps CELERY_WORKER_PREFETCH_MULTIPLIER), or an old name;
    None if absent."""
    suffix = "_" + name.lower()
    for key, value in conf.items():
        if isinstance(key, str) and (key.lower() == name or key.lower().endswith(suffix) or key.upper() in old):
            return value
    return None


def _eager(conf: Mapping[str, Any] | None) -> bool | None:
    if conf is None:
        return None
    value = setting(conf, "task_always_eager", "CELERY_ALWAYS_EAGER")
    # Absent from the non-default settings: Celery's default, off.
    return value is True or (isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"))


def _multiplier(conf: Mapping[str, Any] | None, stat: Mapping[str, Any], concurrency: int | None) -> int | None:
    if conf is not None:
        configured = _positive(setting(conf, "worker_prefetch_multiplier", "CELERYD_PREFETCH_MULTIPLIER"))
        if configured:
            return configured
    prefetch = _positive(stat.get("prefetch_count"))  # the consumer's qos now: concurrency x multiplier
    if prefetch and concurrency:
        return max(1, prefetch // concurrency)
    return DEFAULT_PREFETCH_MULTIPLIER if conf is not None else None


def worker_facts(active_queues: Any, stats: Any, conf: Any) -> dict[str, WorkerFacts]:
    """Nodename -> what that worker said, from the three inspect replies as received (any shape)."""
    replies = [_dict(active_queues), _dict(stats), _dict(conf)]
    nodes = sorted({n for r in replies for n in r if isinstance(n, str)})[:MAX_WORKERS]
    found: dict[str, WorkerFacts] = {}
    for node in nodes:
        stat = _dict(replies[1].get(node))
        pool = _dict(stat.get("pool"))
        settings = replies[2].get(node)
        settings = settings if isinstance(settings, dict) else None
        concurrency = _positive(pool.get("max-concurrency"))
        name = printable(node, 200)
        found[name] = WorkerFacts(
            nodename=name,
            host=name.partition("@")[2] or name,
            queues=_queues(replies[0].get(node)),
            pool=_pool_kind(pool.get("implementation")),
            concurrency=concurrency,
            max_tasks_per_child=_positive(pool.get("max-tasks-per-child")),
            max_memory_per_child=_positive(setting(settings or {}, "worker_max_memory_per_child",
                                                   "CELERYD_MAX_MEMORY_PER_CHILD")),
            prefetch_multiplier=_multiplier(settings, stat, concurrency),
            always_eager=_eager(settings),
        )
    return found


def _no_unacked_restore(channel: Any) -> None:
    """Keep kombu from moving tasks: while it polls for replies, its Redis channel would also restore unacked
    messages older than the visibility timeout to their queues (taking the `unacked_mutex` key to do it).
    That is the workers' job; the doctor only reads, so this channel's restore does nothing."""
    qos = getattr(channel, "qos", None)
    if qos is not None and hasattr(qos, "restore_visible"):
        qos.restore_visible = lambda *_args, **_kwargs: None


def read_workers(broker_url: str, *, timeout: float) -> dict[str, WorkerFacts]:
    """Ask every live worker (active_queues, stats, conf), each broadcast waiting `timeout` seconds."""
    app = Celery("autoscaler-doctor", broker=broker_url, set_as_current=False)
    app.conf.broker_connection_timeout = timeout
    app.conf.broker_connection_retry = False
    app.conf.broker_connection_max_retries = 0
    try:
        with app.connection_for_read() as connection:
            _no_unacked_restore(connection.default_channel)
            inspect = app.control.inspect(timeout=timeout, connection=connection)
            queues, stats, conf = inspect.active_queues(), inspect.stats(), inspect.conf()
    except Exception as exc:  # kombu/redis raise many kinds; the doctor reports them all the same way
        raise CannotCheckError(
            f"cannot ask the workers over the broker at {redact_url(broker_url)}: {safe_error(exc, 300)}") from None
    finally:
        app.close()
    return worker_facts(queues, stats, conf)
