"""Which Celery workers are running a task right now: the Compose backend's hint for choosing idle victims.

Asks every worker over the broker (`inspect().active()`), in a background thread. Given the hosts of the
pool's workers (their containers' hostnames, which Celery's default node name `celery@%h` and any `-n x@%h`
carry after the `@`), it stops listening as soon as each of them has answered, typically within a few
milliseconds; otherwise (or if one is silent) it gives up after a short timeout, so a scale-down is never
delayed by more than about a second. The node names themselves are not known ahead (`-n` templates), so the
question goes to every worker, as before, and only the wait is cut. Any failure or silence means "unknown"
(None): the backend then picks victims by age alone, and the warm shutdown still lets a busy victim finish
its task.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from celery import Celery
from loguru import logger

from autoscaler.policy.model import PoolPolicy

__all__ = ["DEFAULT_PROBE_TIMEOUT", "CeleryBusyProbe", "busy_hosts", "worker_nodes"]

DEFAULT_PROBE_TIMEOUT = 1.0
# Beyond the broadcast's own timeout: connecting to the broker and collecting the replies.
WAIT_MARGIN = 0.5


def busy_hosts(replies: dict[str, Any] | None) -> set[str] | None:
    """`{"celery@abc123": [task, ...]}` -> `{"abc123"}`: hosts of workers with at least one active task."""
    if not replies:
        return None  # nobody answered: unknown, not "all idle"
    return {node.partition("@")[2] or node for node, tasks in replies.items() if tasks}


def worker_nodes(replies: dict[str, Any] | None) -> dict[str, bool] | None:
    """`{"celery@abc123": [task, ...]}` -> `{"celery@abc123": True}`: every answering worker, busy or not."""
    if not replies:
        return None
    return {str(node): bool(tasks) for node, tasks in replies.items()}


class CeleryBusyProbe:
    """A `BusyProbe` for `ComposeBackend`: `probe(pool)` -> hostnames of busy workers, or None if unknown.

    `broker_url` is Celery's broker (settings.redis_url). One probe runs at a time (one broadcast in flight): a
    call made while other pools' probes are under way (their actions run at once) waits for them, then asks its
    own question; it answers None only if its own answer does not come in time. Each waits for the probes ahead
    of it as well as for its own, so a busy broker delays a scale-down by a probe per pool at most; a call that
    gives up withdraws its probe if it has not started, so a slow broker does not pile them up.
    """

    def __init__(self, *, broker_url: str, timeout: float = DEFAULT_PROBE_TIMEOUT) -> None:
        self._timeout = timeout
        self._app = Celery("autoscaler-busy-probe", broker=broker_url, set_as_current=False)
        self._app.conf.broker_connection_timeout = timeout
        self._app.conf.broker_connection_retry = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="celery-busy-probe")
        self._pending: list[Future[dict[str, Any] | None]] = []  # submitted, not yet done: at most one per pool
        self._lock = threading.Lock()

    def __call__(self, pool: PoolPolicy, *, hosts: frozenset[str] | None = None) -> set[str] | None:
        return busy_hosts(self._replies(pool, hosts))

    def workers(self, pool: PoolPolicy, *, hosts: frozenset[str] | None = None) -> dict[str, bool] | None:
        """Node name -> busy for every worker that answered (all pools: the caller matches its own)."""
        return worker_nodes(self._replies(pool, hosts))

    def shutdown(self, nodenames: list[str]) -> None:
        """Ask these workers for a warm shutdown: they stop consuming, finish what they run, and exit 0."""
        self._app.control.shutdown(destination=nodenames)

    def _replies(self, pool: PoolPolicy, hosts: frozenset[str] | None) -> dict[str, Any] | None:
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()]
            ahead = len(self._pending)
            pending = self._executor.submit(self._ask, hosts or None)
            self._pending.append(pending)
        # Returning None here would not be "unknown broker": on Swarm it lets Swarm choose the victims itself.
        wait = (self._timeout + WAIT_MARGIN) * (1 + ahead)
        try:
            return pending.result(timeout=wait)
        except FutureTimeout:
            pending.cancel()  # not started yet: it never will (a started one ends within its own timeout)
            logger.debug("pool {}: no busy-worker answer in {:.1f}s", pool.name, wait)
            return None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._app.close()

    def _ask(self, hosts: frozenset[str] | None = None) -> dict[str, Any] | None:
        collected: dict[str, Any] = {}

        def on_reply(reply: Any) -> None:
            if isinstance(reply, dict):
                collected.update(reply)
            if hosts and hosts <= {str(node).partition("@")[2] or str(node) for node in collected}:
                # kombu collects until `timeout` passes without a reply; nothing else ends it early.
                raise _AllAnswered

        try:
            replies: dict[str, Any] | None = self._app.control.inspect(
                timeout=self._timeout, callback=on_reply
            ).active()
        except _AllAnswered:
            return collected
        except Exception as exc:  # broker down, auth, anything: the answer is just "unknown"
            logger.debug("busy-worker probe failed: {}", exc)
            return None
        return replies if isinstance(replies, dict) else None


class _AllAnswered(Exception):  # noqa: N818 - a signal to stop listening, not an error
    """Every expected worker answered: stop listening."""
