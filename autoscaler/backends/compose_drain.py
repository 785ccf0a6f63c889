"""Draining Compose replicas: stop each victim with its grace (SIGTERM: Celery's warm shutdown), then remove it.

Stops run in background threads so a tick never waits for a warm shutdown. Each drain has a deadline (when
its grace ends); the marks (container id, deadline) go into the pool's state in Redis, so that a controller
restarted mid-drain takes the stops over (`resume_plan`) instead of counting those workers as capacity.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

from loguru import logger

from autoscaler.backends.base import BackendError
from autoscaler.backends.compose_model import Replica, ServiceRef
from autoscaler.backends.docker_client import DockerConnection, DockerNotFoundError

__all__ = ["CLOSE_GRACE", "STOP_WORKERS", "Drainer", "resume_plan"]

STOP_WORKERS = 32
# On close, how long to let stops that are under way finish their remove step.
CLOSE_GRACE = 5.0
DrainMarks = tuple[tuple[str, float], ...]


class Drainer:
    """The replicas being stopped, per pool, and the threads stopping them."""

    def __init__(self, docker_connection: DockerConnection, *, clock: Callable[[], float] = time.time) -> None:
        self._docker = docker_connection
        self._clock = clock
        self._stopper = ThreadPoolExecutor(max_workers=STOP_WORKERS, thread_name_prefix="compose-stop")
        self._lock = threading.Lock()
        self._draining: dict[str, tuple[str, Future[None]]] = {}  # container id -> (pool, stop)
        self._deadlines: dict[str, float] = {}  # container id -> when its stop's grace ends

    def ids(self, pool: str) -> set[str]:
        with self._lock:
            return {cid for cid, (owner, _) in self._draining.items() if owner == pool}

    def marks(self, pool: str) -> DrainMarks:
        now = self._clock()
        with self._lock:
            return tuple(
                (cid, self._deadlines.get(cid, now)) for cid, (owner, _) in self._draining.items() if owner == pool
            )

    def start(
        self, pool: str, target: ServiceRef, victims: Sequence[Replica], *, grace: int, keep: str | None = None,
        resumed: bool = False,
    ) -> None:
        """Stop `victims` in the background with `grace` seconds each; `keep` is stopped but not removed.

        A drain begun now is a decision: its stop is fenced (a replica that lost its lease in between does not
        stop anything). A `resumed` drain finishes one already marked in the pool's state: not fenced."""
        deadline = self._clock() + grace
        with self._lock:
            for victim in victims:
                if victim.id in self._draining:
                    continue
                self._deadlines[victim.id] = deadline
                future = self._stopper.submit(
                    self._drain, target, victim, grace, keep=victim.id == keep, fenced=not resumed
                )
                self._draining[victim.id] = (pool, future)

    def close(self) -> None:
        with self._lock:
            stops = [future for _, future in self._draining.values()]
        wait(stops, timeout=CLOSE_GRACE)
        self._stopper.shutdown(wait=False, cancel_futures=True)

    def _drain(
        self, target: ServiceRef, victim: Replica, grace: int, *, keep: bool = False, fenced: bool = True
    ) -> None:
        started = time.monotonic()
        # Once stopping, the victim is marked in the pool's state and whoever leads next stops and removes the
        # same one: the remove (and a resumed stop) is not fenced, so a leader that stops cleanly (its lock
        # released) or loses its lease mid-drain finishes what it began instead of leaving a stopped victim.
        try:
            self._docker.call(
                f"stop container {victim.name}", lambda c: c.api.stop(victim.id, timeout=grace), fenced=fenced
            )
            if keep:
                logger.info("{}: stopped {} in {:.1f}s and kept it: at zero replicas it is the template a "
                            "scale-up clones", target, victim.name, time.monotonic() - started)
                return
            # v=True: a worker's anonymous volumes die with it, as with `docker compose down -v`.
            self._docker.call(
                f"remove container {victim.name}", lambda c: c.api.remove_container(victim.id, v=True), fenced=False
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


def resume_plan(
    replicas: Sequence[Replica], marks: DrainMarks, *, now: float, stop_timeout: float
) -> tuple[list[tuple[Replica, int]], str | None, list[str]]:
    """Which marked replicas to drain again, each with its remaining grace; the one to keep; ids ignored.

    Marks come from Redis, which any broker client can write: only `replicas` (the target's own containers)
    are acted on, and no grace is longer than the pool's own `stop_timeout`. As for a scale-down to zero,
    if nothing else would be left, the newest is kept as the template.
    """
    by_id = {r.id: r for r in replicas}
    ours = [(by_id[cid], deadline) for cid, deadline in marks if cid in by_id]
    ignored = [cid[:12] for cid, _ in marks if cid not in by_id]
    keep = None
    if ours and len(ours) == len(by_id):
        keep = max((r for r, _ in ours), key=lambda r: r.newest_first_key()).id
    plan = [(r, math.ceil(min(max(deadline - now, 1.0), stop_timeout))) for r, deadline in ours]
    return plan, keep, ignored
