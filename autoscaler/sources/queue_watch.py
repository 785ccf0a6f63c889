"""The queue watcher: between ticks, counts every watched pool's waiting messages and wakes the loop for a pool
whose count reached its threshold. It decides nothing: a wake only makes the loop run that pool's ordinary
full read and decision at once (see loop.Controller.evaluate).

Why an LLEN probe, not keyspace notifications or a producer's hint: the probe needs nothing from the broker's
configuration (`notify-keyspace-events` is off by default and a user's broker may not allow turning it on) nor
from the producers (tasks published without `autoscaler.celery` still count), and it costs one EVALSHA per
probe whatever the number of queues: one LLEN per list key (the queue and its priority sub-lists, as kombu
names them), summed per queue inside Redis (queue_watch.lua). Every 250 ms that is 4 commands a second.

Everything a broker client can write is a hint here: anyone may LPUSH to a queue. An inflated count causes an
early full read, nothing more, and early reads are rate-limited per pool: at most one every `min_gap`
(250 ms) and at most `max_per_interval` (8) within any `interval` seconds. A pool is woken only when its
count reached the threshold the loop gave it and rose above the count it was last woken at (or read at): a
steady queue held back by a cooldown or `sustain` does not wake the loop again and again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

import redis
from loguru import logger

from autoscaler.policy.model import BrokerOptions

__all__ = ["MAX_PER_INTERVAL", "MIN_GAP", "PROBE_PERIOD", "QueueWatcher", "WatchPlan", "WatchTarget", "queue_keys"]

PROBE_PERIOD = 0.25
MIN_GAP = 0.25
MAX_PER_INTERVAL = 8
_SCRIPT_RESOURCE = "queue_watch.lua"


@dataclass(frozen=True, slots=True)
class WatchTarget:
    """One pool, as the loop hands it over after its last full read: wake it when the summed count of its
    `queues` is at least `threshold` and above `level` (the count that read saw)."""

    queues: tuple[str, ...]
    threshold: int
    level: int


@dataclass(frozen=True, slots=True)
class WatchPlan:
    broker: BrokerOptions = field(default_factory=BrokerOptions)
    interval: float = 15.0
    pools: dict[str, WatchTarget] = field(default_factory=dict)


def queue_keys(broker: BrokerOptions, queue: str) -> list[str]:
    """kombu's list keys of `queue` (as CeleryRedisSource reads them): step 0 the bare key, others suffixed."""
    return [f"{broker.key_prefix}{queue}{'' if step == 0 else f'{broker.separator}{step}'}"
            for step in broker.priority_steps]


class QueueWatcher:
    """Probes in its own thread (`start`/`stop`), or once per `probe()` call (tests, benches)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        plan: Callable[[], WatchPlan],
        on_wake: Callable[[str], None],
        period: float = PROBE_PERIOD,
        min_gap: float = MIN_GAP,
        max_per_interval: int = MAX_PER_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._plan = plan
        self._on_wake = on_wake
        self._period = period
        self._min_gap = min_gap
        self._max_per_interval = max_per_interval
        self._clock = clock
        self._script = client.register_script(
            resources.files("autoscaler.sources").joinpath(_SCRIPT_RESOURCE).read_text(encoding="utf-8")
        )
        self._woken: dict[str, deque[float]] = {}
        self._woken_at: dict[str, tuple[WatchTarget, int]] = {}  # the target and count of the last wake
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self.probes = 0  # for benches

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="queue-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self.probe()

    def probe(self) -> list[str]:
        """Count once; wake (and return) the pools due. Never raises: a failed probe only delays a scale-up
        to the next tick, which reads the broker itself and says what is wrong."""
        plan = self._plan()
        if not plan.pools:
            return []
        queues = list(dict.fromkeys(q for target in plan.pools.values() for q in target.queues))
        keys = [k for q in queues for k in queue_keys(plan.broker, q)]
        try:
            sums = self._script(keys=keys, args=[len(plan.broker.priority_steps)])
        except redis.RedisError as exc:
            if not self._failing:
                logger.bind(error=str(exc)).warning("queue watch: cannot count the queues ({}); ticks go on", exc)
            self._failing = True
            return []
        self._failing = False
        self.probes += 1
        counts = dict(zip(queues, (int(n) for n in sums), strict=False))
        woken = []
        for pool, target in plan.pools.items():
            count = sum(counts.get(q, 0) for q in target.queues)
            if self._due(pool, target, count, plan.interval):
                woken.append(pool)
                self._on_wake(pool)
        return woken

    def _due(self, pool: str, target: WatchTarget, count: int, interval: float) -> bool:
        if count < target.threshold:
            return False
        last = self._woken_at.get(pool)
        # Since the last wake, the loop may not have read the pool yet (its target is the same): only a further
        # rise counts. A new target (a full read since) starts from what that read saw.
        level = last[1] if last is not None and last[0] == target else target.level
        if count <= level:
            return False
        now = self._clock()
        times = self._woken.setdefault(pool, deque())
        while times and now - times[0] >= interval:
            times.popleft()
        if (times and now - times[-1] < self._min_gap) or len(times) >= self._max_per_interval:
            return False
        times.append(now)
        self._woken_at[pool] = (target, count)
        return True
