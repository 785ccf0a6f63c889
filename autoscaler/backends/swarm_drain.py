"""Idle-first, lossless scale-down of a Swarm service.

Swarm chooses which task to remove when the replica count drops (moby#33426 is still open) and stops it
with the service's stop_grace_period: it removed busy workers while idle ones stayed, and a task longer than
the grace is killed. So the count is not lowered first. The victims are chosen among the running tasks,
idle Celery workers first (newest first among equals), and asked for a warm shutdown over Celery's remote
control: each stops consuming, finishes what it runs, however long, and exits 0. A watcher then keeps the
replica count at `final + victims still running` (never above `max`, + `surge`: victims count toward it, see
`drain_spec`), so each exited victim's slot is removed as soon as it is
seen (every half second): Swarm removes slots whose task is not running before running ones (swarmkit's
replicated orchestrator, for equal node balance), and its restart delay (5 s by default) keeps the slot
empty until then. A scale decided during a drain moves `final`; the same rule then raises or lowers the count.

Every engine call is fenced (only the leader acts). A lease check that fails pauses the watcher, not the
drain: the marks stay, and the watcher carries on once the controller holds the lease again. If it took the
lock anew meanwhile (another replica may have led, and finished or changed the drain), the paused drain is
stale: it is dropped without acting, and the marks the pool's state holds are followed instead.

Telling the workers apart needs their Celery node names to carry the container's hostname (`-n name@%h`,
Swarm's default hostname being the container id's first 12 characters). When they cannot be matched to the
tasks (no answer from Celery, a templated hostname), the backend lowers the count itself, as before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from loguru import logger

from autoscaler.backends.base import BackendError, LeaseLostError
from autoscaler.policy.model import PoolPolicy

__all__ = ["POLL", "SwarmDrainer", "WorkerControl", "choose_victims", "drain_spec", "task_hostname"]

POLL = 0.5
MAX_BACKOFF = 10.0
# A victim that has not exited by its pool's stop_timeout is given up on: the count goes to `final` and Swarm
# stops a task of its choice with the service's grace. The shutdown request is repeated meanwhile, in case a
# worker missed it (a broker restart).
RESEND_EVERY = 30.0

DrainMarks = tuple[tuple[str, float], ...]


class WorkerControl(Protocol):
    def workers(self, pool: PoolPolicy, *, hosts: frozenset[str] | None = None) -> dict[str, bool] | None: ...
    def shutdown(self, nodenames: list[str]) -> None: ...


def task_hostname(task: dict[str, Any], spec_hostname: str) -> str | None:
    """The hostname a task's container has (Swarm's default: the container id's first 12 characters)."""
    if spec_hostname:
        return None  # templated per task: not derivable from the task list
    container = str(((task.get("Status") or {}).get("ContainerStatus") or {}).get("ContainerID") or "")
    return container[:12] or None


def choose_victims(
    running: list[dict[str, Any]], nodes: dict[str, bool], *, count: int, spec_hostname: str
) -> dict[str, str] | None:
    """Task id -> Celery node name of `count` running tasks: idle workers first, newest first; None when
    fewer than `count` running tasks can be matched to a worker that answered."""
    # Node names come over the broker, which any client can write: a host claimed by two names is ambiguous
    # (one may be a fake answering for the real worker) and is never a victim.
    claims: dict[str, list[str]] = {}
    for node in nodes:
        claims.setdefault(node.partition("@")[2], []).append(node)
    by_host = {host: names[0] for host, names in claims.items() if len(names) == 1}
    matched = []
    for task in running:
        host = task_hostname(task, spec_hostname)
        if host is not None and host in by_host:
            node = by_host[host]
            matched.append((nodes[node], str(task.get("CreatedAt") or ""), str(task["ID"]), node))
    if len(matched) < count:
        return None
    matched.sort(key=lambda m: (m[0], _reverse(m[1])))  # idle (False) first, then the newest
    return {task_id: node for _, _, task_id, node in matched[:count]}


def _reverse(text: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in text)


@dataclass
class _Drain:
    pool: PoolPolicy
    service_id: str
    final: int
    victims: dict[str, str]  # task id -> node name
    deadlines: dict[str, float]
    sent: float
    term: int  # the lease term it was begun or resumed under
    paused: str | None = None  # why the watcher waits: the lease could not be confirmed
    done: threading.Event = field(default_factory=threading.Event)


class _SupersededError(Exception):
    """The drain was begun under an earlier lease term: another replica may have led since."""


class SwarmDrainer:
    """The drains under way, one per pool, each followed by a watcher thread."""

    def __init__(
        self,
        *,
        control: WorkerControl,
        list_tasks: Callable[[str], list[dict[str, Any]]],
        set_replicas: Callable[[PoolPolicy, int], None],
        fence: Callable[[str], None] | None = None,
        lease_term: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.time,
        poll: float = POLL,
    ) -> None:
        """`lease_term` (`Fence.term`) tells a pause within one lease from a lease taken anew."""
        self._control = control
        self._list_tasks = list_tasks
        self._set_replicas = set_replicas
        self._fence = fence
        self._term = lease_term or (lambda: 0)
        self._clock = clock
        self._poll = poll
        self._lock = threading.Lock()
        self._drains: dict[str, _Drain] = {}
        # One watcher per pool with a drain: never queued behind another pool's (its victims would exit and be
        # restarted meanwhile).
        self._watchers = ThreadPoolExecutor(max_workers=64, thread_name_prefix="swarm-drain")

    def draining(self, pool: str) -> set[str]:
        term = self._term()
        with self._lock:
            drain = self._live(pool, term)
            return set(drain.victims) if drain is not None else set()

    def marks(self, pool: str) -> DrainMarks:
        """The victims and their deadlines, for the pool's state (a paused drain's included)."""
        term = self._term()
        with self._lock:
            drain = self._live(pool, term)
            return tuple(sorted(drain.deadlines.items())) if drain is not None else ()

    def final(self, pool: str) -> int | None:
        """The count a drain under way ends at (None: no drain): what the pool was asked to become."""
        term = self._term()
        with self._lock:
            drain = self._live(pool, term)
            return drain.final if drain is not None else None

    def retarget(self, pool: str, final: int) -> bool:
        """A new decision during a drain: it now ends at `final` (the watcher applies it). False: no drain."""
        term = self._term()
        with self._lock:
            drain = self._live(pool, term)
            if drain is None:
                return False
            drain.final = final
            return True

    def _live(self, pool: str, term: int) -> _Drain | None:
        """The pool's drain, unless it ended or was begun under an earlier lease term. Call with the lock held."""
        drain = self._drains.get(pool)
        if drain is None or drain.done.is_set() or drain.term != term:
            return None
        return drain

    def begin(self, pool: PoolPolicy, service: dict[str, Any], tasks: list[dict[str, Any]], *, desired: int) -> bool:
        """Start draining down to `desired`; False when the workers cannot be told apart (the caller then
        lowers the count itself)."""
        spec_hostname = _spec_hostname(service)
        already = self.draining(pool.name)
        running = [t for t in tasks if _is_running(t) and str(t.get("ID")) not in already]
        count = len(running) - desired
        if count <= 0:
            return self.retarget(pool.name, desired)
        if self._fence is not None:  # renewed before the probe's wait, not only after it (compose.py: _busy)
            self._fence(f"ask which workers of pool {pool.name} are busy")
        # The hosts that should answer: the probe stops waiting once they all have.
        hosts = frozenset(h for t in running if (h := task_hostname(t, spec_hostname)) is not None)
        nodes = self._control.workers(pool, hosts=hosts or None)
        victims = None if nodes is None else choose_victims(running, nodes, count=count, spec_hostname=spec_hostname)
        if victims is None:
            why = "a templated hostname" if spec_hostname else "no Celery answer matching its tasks"
            logger.warning("pool {}: cannot tell which worker runs in which task ({}); Swarm chooses", pool.name, why)
            return False
        self._shutdown(pool, list(victims.values()))
        deadline = self._clock() + pool.stop_timeout
        term = self._term()
        with self._lock:
            current = self._live(pool.name, term)
            if current is not None:
                current.victims.update(victims)
                current.deadlines.update(dict.fromkeys(victims, deadline))
                current.final = desired
                return True
            self._drop_stale(pool.name)
            drain = _Drain(pool, str(service["ID"]), desired, dict(victims), dict.fromkeys(victims, deadline),
                           self._clock(), term)
            self._drains[pool.name] = drain
        logger.info("pool {}: warm shutdown asked of {} (idle first); the count follows as they exit",
                    pool.name, ", ".join(sorted(victims.values())))
        self._watchers.submit(self._watch, drain)
        return True

    def resume(self, pool: PoolPolicy, service: dict[str, Any], tasks: list[dict[str, Any]], marks: DrainMarks,
               *, replicas: int) -> None:
        """Leadership (re)starts mid-drain: follow the marked tasks that still run (only this service's).

        Marks come from the stored state: deadlines are capped at the pool's stop_timeout from now, and the
        victims' node names are asked of Celery again (to repeat the shutdown request). A drain this replica
        follows under the same lease term (paused by a lease check that went unanswered) goes on as it is; one
        from an earlier term is replaced."""
        term = self._term()
        with self._lock:
            if self._live(pool.name, term) is not None:
                return
        running = {str(t.get("ID")): t for t in tasks if _is_running(t)}
        latest = self._clock() + pool.stop_timeout
        alive = {task_id: min(deadline, latest) for task_id, deadline in marks if task_id in running}
        if not alive:
            return
        spec_hostname = _spec_hostname(service)
        nodes = self._control.workers(pool) or {}
        named = choose_victims([running[t] for t in alive], nodes, count=len(alive), spec_hostname=spec_hostname)
        victims = {task_id: (named or {}).get(task_id, "") for task_id in alive}
        with self._lock:
            if self._live(pool.name, term) is not None:
                return
            self._drop_stale(pool.name)
            drain = _Drain(pool, str(service["ID"]), max(0, replicas - len(alive)), victims, alive, 0.0, term)
            self._drains[pool.name] = drain
        logger.info("pool {}: following the warm shutdown of {} task(s) begun by an earlier controller",
                    pool.name, len(alive))
        self._watchers.submit(self._watch, drain)

    def close(self) -> None:
        with self._lock:
            for drain in self._drains.values():
                drain.done.set()
        self._watchers.shutdown(wait=False, cancel_futures=True)

    def _drop_stale(self, pool: str) -> None:
        """End a drain of an earlier term (its watcher stops without acting). Call with the lock held."""
        stale = self._drains.pop(pool, None)
        if stale is not None:
            stale.done.set()

    def _shutdown(self, pool: PoolPolicy, nodenames: list[str]) -> None:
        if self._fence is not None:
            self._fence(f"ask {len(nodenames)} worker(s) of pool {pool.name} for a warm shutdown")
        try:
            self._control.shutdown(nodenames)
        except Exception as exc:  # the broker: the resend, or the deadline, takes it from here
            logger.warning("pool {}: could not ask {} for a warm shutdown: {}", pool.name, nodenames, exc)

    def _watch(self, drain: _Drain) -> None:
        name = drain.pool.name
        failures = 0
        while not drain.done.wait(min(self._poll * 2**failures, MAX_BACKOFF)):
            try:
                finished = self._step(drain)
            except LeaseLostError as exc:
                # Often one lease check Redis did not answer, and the next tick renews the lease: ending the drain
                # would forget its marks. Paused, it keeps them, for this replica once it holds the lease again
                # (the fence fails fast meanwhile), and in the state for another leader.
                if drain.paused is None:
                    logger.warning("pool {}: drain paused until this replica holds the leader lease again: {}",
                                   name, exc)
                drain.paused = str(exc)
                failures = 0
                continue
            except _SupersededError:
                logger.info("pool {}: dropping the drain begun under an earlier lease (this replica took the lock "
                            "anew: another replica may have led in between); the pool's stored state says what is "
                            "left of it", name)
                with self._lock:
                    drain.done.set()
                return
            except BackendError as exc:
                # The daemon restarting, a deploy racing the update: keep following, more slowly.
                failures = min(failures + 1, 6)
                logger.warning("pool {}: drain watcher: {}; retrying", name, exc)
                continue
            except Exception as exc:
                logger.opt(exception=exc).error("pool {}: the drain watcher failed: {}", name, exc)
                drain.done.set()
                return
            failures = 0
            if drain.paused is not None:
                logger.info("pool {}: drain resumed (the leader lease is this replica's again)", name)
                drain.paused = None
            if finished:
                logger.info("pool {}: drain finished at {} replicas", name, drain.final)
                return

    def _step(self, drain: _Drain) -> bool:
        """One look at the victims and one count update; True (and the drain done) once none is left."""
        tasks = self._list_tasks(drain.service_id)
        # After the fence passed: a lease taken anew since the drain began has bumped the term by now.
        if self._term() != drain.term:
            raise _SupersededError
        running = {str(t.get("ID")) for t in tasks if _is_running(t)}
        now = self._clock()
        with self._lock:
            alive = {task_id for task_id in drain.victims if task_id in running}
            late = {task_id for task_id in alive if drain.deadlines.get(task_id, now) <= now}
            final = drain.final
        if late:
            logger.warning("pool {}: {} victim(s) still running after stop_timeout; Swarm chooses now",
                           drain.pool.name, len(late))
            alive -= late
        nodes = [drain.victims[t] for t in alive if drain.victims[t]]
        if nodes and now - drain.sent >= RESEND_EVERY:
            self._shutdown(drain.pool, nodes)
            drain.sent = now
        self._set_replicas(drain.pool, drain_spec(drain.pool, final, len(alive)))
        with self._lock:
            # A decision taken while the count was being written moves `final`: not done, apply it next time.
            if not alive and drain.final == final:
                drain.done.set()
                return True
        return False


def drain_spec(pool: PoolPolicy, final: int, alive: int) -> int:
    """The replica count while `alive` victims still run: `final` plus them, but never past `max` (+ `surge`, only
    while victims drain). A scale-up decided meanwhile gets its tasks as victims exit, not on top of them."""
    return min(final + alive, pool.max + min(pool.surge, alive))


def _spec_hostname(service: dict[str, Any]) -> str:
    """The service's hostname template (empty: Swarm's default, the container id's first 12 characters)."""
    return str(((service["Spec"].get("TaskTemplate") or {}).get("ContainerSpec") or {}).get("Hostname") or "")


def _is_running(task: dict[str, Any]) -> bool:
    return task.get("DesiredState") == "running" and (task.get("Status") or {}).get("State") == "running"
