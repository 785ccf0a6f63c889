"""Draining Compose replicas: stop each victim with its grace (SIGTERM: Celery's warm shutdown), then remove it.

Each stop runs in a thread of its own, started at once: `POST /containers/{id}/stop?t=grace` holds its call for
the whole warm shutdown, so a shared pool of stop threads made the victims beyond its size wait, uncounted yet
still taking tasks, for another's ten-minute drain to end (issue 17). A thread per victim costs little (a
scale-down of a thousand is a thousand idle threads) and keeps the daemon's own stop: the container's
StopSignal, no restart by its policy, and the SIGKILL at the grace even if this controller is gone.

Each drain is marked (container id, deadline) in the pool's state in Redis, so that a controller restarted
mid-drain takes the stops over (`resume_plan`) instead of counting those workers as capacity. A victim is
marked only once its stop is being sent, and its deadline is that moment plus the grace: a mark never names a
worker that has not had its SIGTERM, and a resumed stop gets the grace that is really left. The threads are
daemon threads: the process exits on SIGTERM without waiting for the warm shutdowns, which the daemon carries
through to the grace on its own; the next leader removes the victims.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import docker
from loguru import logger

from autoscaler.backends.base import BackendError
from autoscaler.backends.compose_model import Replica, ServiceRef
from autoscaler.backends.docker_client import DockerConnection, DockerNotFoundError

__all__ = ["CLOSE_GRACE", "SEND_SETTLE", "Drainer", "resume_plan"]

# On close, how long to let stops that are under way finish their remove step (the next leader does the rest).
CLOSE_GRACE = 1.0
# How long reading the marks waits for stops begun a moment ago to be sent (a lease check and a connect: ms),
# so that the state saved at the end of the tick that began them already names them.
SEND_SETTLE = 2.0
DrainMarks = tuple[tuple[str, float], ...]


class _NotSentError(Exception):
    """The drainer was closed before this victim's stop went out: it is left running (and unmarked)."""


@dataclass(slots=True)
class _Drain:
    pool: str
    deadline: float | None = None  # when its grace ends; None until its stop is being sent


class Drainer:
    """The replicas being stopped, per pool, each by a thread of its own."""

    def __init__(self, docker_connection: DockerConnection, *, clock: Callable[[], float] = time.time) -> None:
        self._docker = docker_connection
        self._clock = clock
        self._lock = threading.Condition()
        self._draining: dict[str, _Drain] = {}  # container id -> its drain
        self._threads: list[threading.Thread] = []
        self._closed = False

    def ids(self, pool: str) -> set[str]:
        """The pool's victims, sent their stop or about to be: none is counted as capacity."""
        with self._lock:
            return {cid for cid, drain in self._draining.items() if drain.pool == pool}

    def marks(self, pool: str, *, settle: float = SEND_SETTLE) -> DrainMarks:
        """The pool's victims whose stop has been sent, with their deadlines (what the pool's state keeps).

        Waits up to `settle` for the stops begun a moment ago to go out, so that they are in this save."""
        until = time.monotonic() + settle
        with self._lock:
            self._lock.wait_for(
                lambda: all(d.deadline is not None for d in self._draining.values() if d.pool == pool),
                timeout=max(0.0, until - time.monotonic()),
            )
            return tuple(
                (cid, d.deadline) for cid, d in self._draining.items() if d.pool == pool and d.deadline is not None
            )

    def start(
        self, pool: str, target: ServiceRef, victims: Sequence[Replica], *, grace: int, keep: str | None = None,
        resumed: bool = False,
    ) -> None:
        """Stop `victims` in the background with `grace` seconds each; `keep` is stopped but not removed.

        A drain begun now is a decision: its stop is fenced (a replica that lost its lease in between does not
        stop anything). A `resumed` drain finishes one already marked in the pool's state: not fenced, and
        marked from the start (its SIGTERM went out from an earlier controller; `grace` is what is left)."""
        with self._lock:
            if self._closed:
                return
            self._threads = [t for t in self._threads if t.is_alive()]
            for victim in victims:
                if victim.id in self._draining:
                    continue
                self._draining[victim.id] = _Drain(pool, self._clock() + grace if resumed else None)
                thread = threading.Thread(
                    target=self._drain, args=(target, victim, grace),
                    kwargs={"keep": victim.id == keep, "fenced": not resumed},
                    name=f"compose-stop-{victim.name}", daemon=True,
                )
                self._threads.append(thread)
                thread.start()

    def close(self) -> None:
        """No further stop is sent; stops under way are left to the daemon (their marks are in the state)."""
        with self._lock:
            self._closed = True
            threads, self._threads = self._threads, []
        until = time.monotonic() + CLOSE_GRACE
        for thread in threads:
            thread.join(timeout=max(0.0, until - time.monotonic()))

    def _sending(self, victim: Replica, grace: int) -> None:
        # Called right before each attempt of the stop call (after its lease check): the deadline runs from
        # the SIGTERM, and a drainer that is closing sends nothing more.
        with self._lock:
            if self._closed:
                raise _NotSentError
            self._draining[victim.id].deadline = self._clock() + grace
            self._lock.notify_all()

    def _drain(
        self, target: ServiceRef, victim: Replica, grace: int, *, keep: bool = False, fenced: bool = True
    ) -> None:
        started = time.monotonic()

        def stop(client: docker.DockerClient) -> None:
            self._sending(victim, grace)
            client.api.stop(victim.id, timeout=grace)

        # Once stopping, the victim is marked in the pool's state and whoever leads next stops and removes the
        # same one: the remove (and a resumed stop) is not fenced, so a leader that stops cleanly (its lock
        # released) or loses its lease mid-drain finishes what it began instead of leaving a stopped victim.
        try:
            self._docker.call(f"stop container {victim.name}", stop, fenced=fenced)
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
        except _NotSentError:
            logger.info("{}: shutting down; {} was not sent its stop and keeps running", target, victim.name)
        except DockerNotFoundError:
            logger.info("{}: {} was already gone", target, victim.name)
        except BackendError as exc:
            logger.error("{}: could not stop {}: {}", target, victim.name, exc)
        finally:
            with self._lock:
                self._draining.pop(victim.id, None)
                self._lock.notify_all()


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
