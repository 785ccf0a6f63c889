"""The schedule that drives `Controller.tick`: a fixed interval, woken early by signals."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from loguru import logger

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
) -> None:
    """Tick on a fixed schedule until `stop` is set (between ticks, never inside one).

    A standby polls four times per interval, so with the lock's expiry at 1.5 intervals it takes over
    within 1.75 intervals of the leader's last renewal.
    """
    while not stop.is_set():
        started = time.monotonic()
        force = reload.is_set()
        reload.clear()
        try:
            report = controller.tick(force_reload=force)
        except Exception as exc:
            logger.opt(exception=exc).error("tick failed: {}", exc)
            report = None
        if report is not None and on_tick is not None:
            on_tick(report)
        if once:
            break
        period = interval()
        if report is not None and report.role == "standby":
            period /= 4
        # Signal handlers set `wake` (with `stop` or `reload`) so SIGTERM and SIGHUP act at once.
        # Bounded whatever `interval()` says: Event.wait raises on a timeout too large for the platform.
        timeout = min(max(0.0, period - (time.monotonic() - started)), MAX_WAIT)
        if wake is None:
            stop.wait(timeout)
        else:
            wake.wait(timeout)
            wake.clear()
    controller.stop()
