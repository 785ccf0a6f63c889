"""The schedule that drives `Controller.tick`: a fixed interval, woken early by signals, and by the queue
watcher for a pool whose queues call for a scale-up (an early `Controller.evaluate` of that pool)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

import redis
from loguru import logger

from autoscaler.sources.queue_watch import QueueWatcher

if TYPE_CHECKING:
    from autoscaler.loop import Controller, TickReport

__all__ = ["MAX_WAIT", "run_forever"]

# The longest a loop waits between ticks (policies allow at most an hour).
MAX_WAIT = 3600.0


def run_forever(
    controller: Controller,
    *,
    interval: Callable[[], float],
    stop: threading.Event,
    reload: threading.Event,
    wake: threading.Event | None = None,
    once: bool = False,
    on_tick: Callable[[TickReport], None] | None = None,
    watch_client: redis.Redis | None = None,
) -> None:
    """Tick on a fixed schedule until `stop` is set (between ticks, never inside one).

    A standby polls four times per interval, so with the lock's expiry at 1.5 intervals it takes over
    within 1.75 intervals of the leader's last renewal.

    With `watch_client` (the broker) and `wake`, a queue watcher counts the pools' queues between ticks (while
    this replica leads and the policy's `push` is on) and wakes the loop for a pool whose count calls for a
    scale-up: `Controller.evaluate` then runs that pool's read and decision at once; the ticks keep their
    schedule.
    """
    woken: set[str] = set()
    woken_lock = threading.Lock()

    def on_wake(pool: str) -> None:
        with woken_lock:
            woken.add(pool)
        if wake is not None:
            wake.set()

    def take() -> set[str]:
        with woken_lock:
            pools = set(woken)
            woken.clear()
        return pools

    watcher = None
    if watch_client is not None and wake is not None and not once:
        watcher = QueueWatcher(
            watch_client, plan=lambda: replace(controller.watch_plan(), interval=interval()), on_wake=on_wake
        )
        watcher.start()
    try:
        while not stop.is_set():
            started = time.monotonic()
            force = reload.is_set()
            reload.clear()
            report = _guarded(partial(controller.tick, force_reload=force), "tick")
            take()  # woken before or during the tick: its read was as fresh
            if report is not None and on_tick is not None:
                on_tick(report)
            if once:
                break
            period = interval()
            if report is not None and report.role == "standby":
                period /= 4
            _wait_for_tick(controller, started, period, stop=stop, reload=reload, wake=wake, take=take,
                           on_tick=on_tick)
    finally:
        if watcher is not None:
            watcher.stop()
    controller.stop()


def _wait_for_tick(
    controller: Controller, started: float, period: float, *, stop: threading.Event, reload: threading.Event,
    wake: threading.Event | None, take: Callable[[], set[str]], on_tick: Callable[[TickReport], None] | None,
) -> None:
    """Wait until the next tick is due, running the early evaluations the queue watcher asks for meanwhile."""
    while True:
        # Signal handlers set `wake` (with `stop` or `reload`) so SIGTERM and SIGHUP act at once.
        # Bounded whatever `interval()` says: Event.wait raises on a timeout too large for the platform.
        timeout = min(max(0.0, period - (time.monotonic() - started)), MAX_WAIT)
        if wake is None:
            stop.wait(timeout)
            return
        wake.wait(timeout)
        wake.clear()
        if stop.is_set() or reload.is_set() or time.monotonic() - started >= period:
            return
        pools = take()
        if not pools:
            continue
        report = _guarded(partial(controller.evaluate, pools), "early evaluation")
        if report is not None and report.pools and on_tick is not None:
            on_tick(report)


def _guarded(run: Callable[[], TickReport], what: str) -> TickReport | None:
    try:
        return run()
    except Exception as exc:
        logger.opt(exception=exc).error("{} failed: {}", what, exc)
        return None
