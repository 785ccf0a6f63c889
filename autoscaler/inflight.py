"""Scaling actions that run beside the loop: one per pool at a time, each on its own thread.

Creating, starting or draining the replicas of one pool takes seconds (a container's create and start, the
busy-worker probe); the loop must neither hold the other pools' decisions nor the next evaluation for it. A
pool whose action is under way holds (reason "action under way") until the action's own fenced state write
has recorded it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["ActionsInFlight"]


class ActionsInFlight:
    def __init__(self) -> None:
        self._threads: dict[str, threading.Thread] = {}
        # Held while a pool's state changes in memory and is written: an action's write and the tick's write of
        # all pools then land in the order their states were made.
        self.lock = threading.RLock()

    def busy(self, pool: str) -> bool:
        with self.lock:
            thread = self._threads.get(pool)
            return thread is not None and thread.is_alive()

    def pools(self) -> set[str]:
        with self.lock:
            return {name for name, thread in self._threads.items() if thread.is_alive()}

    def start(self, pool: str, work: Callable[[], None]) -> None:
        """Run `work` for `pool` on its own thread; the caller checked `busy(pool)` first."""
        def run() -> None:
            try:
                work()
            finally:
                with self.lock:
                    if self._threads.get(pool) is threading.current_thread():
                        del self._threads[pool]

        thread = threading.Thread(target=run, name=f"action-{pool}", daemon=True)
        with self.lock:
            self._threads[pool] = thread
        thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the actions under way, all of them together up to `timeout`; True when none is left."""
        with self.lock:
            threads = list(self._threads.values())
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self.pools()
