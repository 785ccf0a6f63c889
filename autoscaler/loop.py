"""The reconcile loop: observe all pools -> read current replicas -> decide -> act (unless dry-run) -> record.

Data flows one way. The metric source is read once per tick for every queue of every pool; the backend is
asked for each pool's replicas; the pure `decide` turns each observation into a decision; the actuator
carries out the ones that change a count; the pools' states go back to Redis in one write. One pool's pass
is in reconcile.py, the schedule that drives the ticks in schedule.py.

Only the replica holding the leader lock acts. A standby polls the lock more often than the leader renews
it, so it takes over within two intervals of the leader's death.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

from loguru import logger

from autoscaler.actions import Actuator
from autoscaler.backends.base import Backend, BackendError
from autoscaler.inflight import ActionsInFlight
from autoscaler.leader import Fence, Lease
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.model import BrokerOptions, Policy, PoolPolicy
from autoscaler.reconcile import PoolReconcile, PoolReport
from autoscaler.schedule import MAX_WAIT, run_forever
from autoscaler.sources.base import BrokerStatsReader, MetricSource, SourceError
from autoscaler.sources.queue_watch import WatchPlan, WatchTarget
from autoscaler.state_store import StateFencedError, StateStoreError
from autoscaler.types import PoolState, QueueStats

__all__ = ["MAX_WAIT", "STARTUP_GRACE", "Controller", "PoolReport", "StateStore", "TickReport", "run_forever"]

# For this long after its first tick, a controller reports a pool whose target does not exist yet as a
# warning: started beside the stack (`compose up`, `stack deploy`), it may tick before the workers exist.
STARTUP_GRACE = 60.0
# How long a stopping controller waits for the scaling actions under way to end and write their state.
STOP_WAIT = 10.0


class StateStore(Protocol):
    def load(self, pools: list[str]) -> dict[str, PoolState]: ...
    def save(self, states: dict[str, PoolState]) -> None: ...


class Lock(Protocol):
    def acquire_or_renew(self, ttl: float | None = None) -> Lease: ...
    def release(self) -> None: ...


class PolicySource(Protocol):
    def poll(self, *, force: bool = False) -> tuple[Policy, str | None]: ...


@dataclass(frozen=True, slots=True)
class TickReport:
    role: str  # "leader" or "standby"
    at: float
    pools: tuple[PoolReport, ...] = ()
    metric_error: str | None = None
    policy_event: str | None = None
    seconds: float = 0.0
    trigger: str = "interval"  # or "push": an early evaluation of the pools the queue watcher woke


@dataclass
class Controller(PoolReconcile):
    """One controller replica. `tick()` does one pass; `run_forever` drives it on the interval."""

    policies: PolicySource
    source: MetricSource
    backend: Backend
    store: StateStore
    metrics: Metrics
    lock: Lock | None = None
    # Checked before every Docker call (the backend's connection holds the same one) and state write.
    fence: Fence | None = None
    # The lease's expiry for a policy: it follows the interval through reloads (wiring: 1.5 intervals).
    lease_ttl: Callable[[Policy], float] | None = None
    dry_run: bool | None = None  # None: the policy's own `dry_run` decides
    clock: Callable[[], float] = time.time
    states: dict[str, PoolState] | None = None
    stats: BrokerStatsReader | None = None  # broker memory, task counts, worker beats: for alerts, not decisions
    interval: Callable[[Policy], float] | None = None  # the interval in force (settings may override the policy's)
    last_good_tick: float | None = None
    role: str = "starting"
    startup_grace: float = STARTUP_GRACE
    _checked: set[str] = field(default_factory=set)
    _first_tick: float | None = None
    _broker_applied: BrokerOptions | None = None
    # The stored drain marks of pools whose drains are not followed yet (the backend failed): kept, and retried.
    _unresumed: dict[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)
    _pools: tuple[PoolPolicy, ...] = ()  # the last tick's, for the state written once more at stop()
    # Set: each pool's action runs on its own thread and the tick does not wait for it (wiring sets it; None
    # acts within the tick, as the simulator and most tests want).
    actions: ActionsInFlight | None = None
    _policy: Policy | None = None  # the last tick's: early evaluations and the queue watch use it
    _watch: dict[str, WatchTarget] = field(default_factory=dict)

    def tick(self, *, force_reload: bool = False) -> TickReport:
        started = self.clock()
        if self._first_tick is None:
            self._first_tick = started
        policy, event = self.policies.poll(force=force_reload)
        if event is not None:
            self.metrics.policy_reloads.labels("ok" if event == "reloaded" else "invalid").inc()
            self._checked.clear()  # report missing targets again on every reload
        if not self._lead(policy):
            return TickReport(role="standby", at=started, policy_event=event)

        if self.states is None:
            try:
                self.states = self.store.load([p.name for p in policy.pools])
            except StateStoreError as exc:
                # Cooldowns and windows unknown: acting now could flap a pool that just scaled.
                logger.bind(error=str(exc)).error("{}; not acting this tick", exc)
                return TickReport(role="leader", at=started, metric_error=str(exc), policy_event=event)
            self._unresumed = {p.name: self.states[p.name].draining for p in policy.pools
                               if p.name in self.states and self.states[p.name].draining}
            for pool in policy.pools:  # a failover must not reset a back-off: failing replicas would churn at once
                with suppress(BackendError):  # no backend for the pool's kind: its status says so every tick
                    saved = self.states.get(pool.name, PoolState())
                    self.backend.resume_start_backoff(pool, saved.backoff)
                    self.backend.resume_standbys(pool, saved.standbys)
        self._resume_drains(policy)
        self._configure_source(policy)
        queues, metric_error = self._observe(policy)
        self.metrics.observe_policy(policy, self.interval(policy) if self.interval else policy.interval)
        if self.stats is not None and metric_error is None:  # a broker the queue read could not reach: no 2nd try
            self.metrics.observe_broker(self.stats, policy, policy.broker, started)
        dry_run = policy.dry_run if self.dry_run is None else self.dry_run
        actuator = Actuator(self.backend, self.metrics, dry_run=dry_run, wall_clock=self.clock)

        self._pools = tuple(policy.pools)
        self._policy = policy
        reports = tuple(
            self._reconcile_isolated(pool, queues, metric_error, actuator, started) for pool in policy.pools
        )
        self._save(reports)
        seconds = self.clock() - started
        self.metrics.tick_duration.observe(seconds)
        if metric_error is None:
            self.last_good_tick = self.clock()
            self.metrics.last_good_tick.set(self.last_good_tick)
        return TickReport(
            role="leader", at=started, pools=reports, metric_error=metric_error, policy_event=event, seconds=seconds
        )

    def evaluate(self, names: Collection[str]) -> TickReport:
        """An early pass over the pools the queue watcher woke: their full read and decision now, between ticks.

        Only a leader that still holds its lease evaluates (the fence confirms it); the decision is the
        ordinary one (sustain, cooldowns, step limits, the gate), except that a scale-down waits for the next
        tick. A failed read decides nothing here: the tick counts failures, at its own rhythm.
        """
        started = self.clock()
        policy = self._policy
        if policy is None or self.role != "leader" or self.states is None:
            return TickReport(role=self.role, at=started, trigger="push")
        pools = [p for p in self._pools if p.name in names]
        if not pools or not self._still_leading("evaluate early"):
            return TickReport(role="leader", at=started, trigger="push")
        queues, metric_error = self._observe(policy, [q for p in pools for q in p.queues])
        if metric_error is not None:
            return TickReport(role="leader", at=started, metric_error=metric_error, trigger="push")
        dry_run = policy.dry_run if self.dry_run is None else self.dry_run
        actuator = Actuator(self.backend, self.metrics, dry_run=dry_run, wall_clock=self.clock)
        reports = tuple(
            self._reconcile_isolated(pool, queues, None, actuator, started, early=True) for pool in pools
        )
        self.metrics.early_evaluations.inc()
        self._save(reports)
        return TickReport(role="leader", at=started, pools=reports, seconds=self.clock() - started, trigger="push")

    def watch_plan(self) -> WatchPlan:
        """What the queue watcher should count, and from what count to wake each pool (none unless this replica
        leads with `push` on); pools whose action is under way hold anyway and are left out."""
        policy = self._policy
        if policy is None or not policy.push or self.role != "leader" or self.states is None:
            return WatchPlan()
        busy = self.actions.pools() if self.actions is not None else set()
        watch = dict(self._watch)
        targets = {p.name: watch[p.name] for p in self._pools if p.name in watch and p.name not in busy}
        return WatchPlan(broker=policy.broker, interval=policy.interval, pools=targets)

    def _save(self, reports: tuple[PoolReport, ...]) -> None:
        """Write the reported pools' states, fenced. Under the actions' lock, from memory: an action that ended
        meanwhile has put its state there, which is newer than the one in its pool's report."""
        with self.actions_lock():
            if self._still_leading("write the pool state") and self.states is not None:
                try:
                    states = self.states
                    self.store.save({r.decision.pool: states.get(r.decision.pool, r.decision.state) for r in reports})
                except StateFencedError as exc:
                    logger.warning("{}; another replica leads now", exc)
                    self.states = None
                except StateStoreError as exc:
                    # Kept in memory; the next successful write catches up. Only a restart in between loses it.
                    logger.bind(error=str(exc)).error("{}; keeping it in memory", exc)
            if self.fence is not None and self.fence.lost is not None:
                # Another replica may have acted since: what this one holds in memory is stale.
                self.states = None

    def _lead(self, policy: Policy) -> bool:
        lock_answered = True
        if self.lock is None:
            leader = True
        else:
            try:
                lease = self.lock.acquire_or_renew(self.lease_ttl(policy) if self.lease_ttl else None)
            except Exception as exc:
                logger.bind(error=str(exc)).error("cannot reach the leader lock ({}); not acting this tick", exc)
                lease, lock_answered = Lease.HELD_BY_OTHER, False
            leader = bool(lease)
            if lease is Lease.ACQUIRED and self.states is not None:
                logger.warning(
                    "the leader lease had lapsed and this replica took it again: reloading the pools' state "
                    "(another replica may have acted in between)"
                )
            if lease is Lease.ACQUIRED:
                self.states = None  # whatever this replica remembers may be stale: read the stored state
        if leader and self.fence is not None:
            # Only once the lease is confirmed ours: a fence re-armed before would let a background drain paused
            # by a lost lease check the lock between the two steps (and fence off this whole tick); a standby's
            # stays closed.
            self.fence.rearm()
        if ("leader" if leader else "standby") != self.role:
            logger.info("this replica is now {}", "the leader" if leader else "a standby")
        if not leader:
            self.states = None  # another replica acts; re-read its state if leadership comes back
            if lock_answered:
                self.last_good_tick = self.clock()  # a standby's good tick is a lock check that answered
        self.role = "leader" if leader else "standby"
        self.metrics.set_leader(leader)
        return leader

    def _configure_source(self, policy: Policy) -> None:
        # The policy's `broker:` block (key prefix, priority steps...) may change with a reload.
        if policy.broker == self._broker_applied:
            return
        reconfigure = getattr(self.source, "reconfigure", None)
        if callable(reconfigure):
            reconfigure(policy.broker)
        self._broker_applied = policy.broker

    def _observe(self, policy: Policy, names: list[str] | None = None) -> tuple[dict[str, QueueStats], str | None]:
        try:
            queues = self.source.observe(policy.queues if names is None else list(dict.fromkeys(names)))
        except SourceError as exc:
            self.metrics.source_errors.inc()
            logger.bind(error=str(exc)).error("metric source failed: {}; every pool holds this tick", exc)
            return {}, str(exc)
        self.metrics.observe_queues(queues.values(), partial=names is not None)
        return queues, None

    def readiness(self, interval: float) -> tuple[bool, dict[str, Any]]:
        """Ready when leader or standby and the last good tick is younger than three intervals."""
        age = None if self.last_good_tick is None else max(0.0, self.clock() - self.last_good_tick)
        ready = self.role in ("leader", "standby") and age is not None and age < 3 * interval
        return ready, {"role": self.role, "last_good_tick_age_s": None if age is None else round(age, 3)}

    def stop(self) -> None:
        """Step down: the stops under way go into the state once more (the next leader resumes them, so the
        process need not wait for them), then the lock is released. Scaling actions under way get a few seconds
        to end and record themselves (a create or a start is seconds; a drain's stops go on in the background)."""
        if self.actions is not None and not self.actions.wait(STOP_WAIT):
            logger.warning("scaling actions still under way at stop: {}", ", ".join(sorted(self.actions.pools())))
        if self.role == "leader" and self.states is not None and self._still_leading("write the pool state"):
            states = {p.name: self._with_drain_marks(p, self.states.get(p.name, PoolState())) for p in self._pools}
            try:
                self.store.save(states)
            except StateStoreError as exc:
                logger.bind(error=str(exc)).error("{}; the drains under way are not recorded", exc)
        if self.lock is not None and self.role == "leader":
            try:
                self.lock.release()
            except Exception as exc:
                logger.warning("could not release the leader lock: {}", exc)

