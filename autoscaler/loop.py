"""The reconcile loop: observe all pools -> read current replicas -> decide -> act (unless dry-run) -> record.

Data flows one way. The metric source is read once per tick for every queue of every pool; the backend is
asked for each pool's replicas; the pure `decide` turns each observation into a decision; the actuator
carries out the ones that change a count; the pools' states go back to Redis in one write.

Only the replica holding the leader lock acts. A standby polls the lock more often than the leader renews
it, so it takes over within two intervals of the leader's death.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from loguru import logger

from autoscaler.actions import ActionResult, Actuator
from autoscaler.backends.base import Backend, BackendError, LeaseLostError, TargetNotFoundError, TargetStatus
from autoscaler.gate import gate
from autoscaler.leader import Fence, Lease
from autoscaler.observability.logs import log_decision
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.decide import decide
from autoscaler.policy.model import BrokerOptions, Policy, PoolPolicy
from autoscaler.sources.base import MetricSource, SourceError
from autoscaler.state_store import StateFencedError, StateStoreError
from autoscaler.types import MAX_DRAINING, Decision, Observation, PoolState, QueueStats

__all__ = ["STARTUP_GRACE", "Controller", "PoolReport", "StateStore", "TickReport", "run_forever"]

# For this long after its first tick, a controller reports a pool whose target does not exist yet as a
# warning: started beside the stack (`compose up`, `stack deploy`), it may tick before the workers exist.
STARTUP_GRACE = 60.0
# The longest a loop waits between ticks (policies allow at most an hour).
MAX_WAIT = 3600.0


class StateStore(Protocol):
    def load(self, pools: list[str]) -> dict[str, PoolState]: ...
    def save(self, states: dict[str, PoolState]) -> None: ...


class Lock(Protocol):
    def acquire_or_renew(self, ttl: float | None = None) -> Lease: ...
    def release(self) -> None: ...


class PolicySource(Protocol):
    def poll(self, *, force: bool = False) -> tuple[Policy, str | None]: ...


@dataclass(frozen=True, slots=True)
class PoolReport:
    decision: Decision
    queues: tuple[QueueStats, ...]
    action: ActionResult | None = None


@dataclass(frozen=True, slots=True)
class TickReport:
    role: str  # "leader" or "standby"
    at: float
    pools: tuple[PoolReport, ...] = ()
    metric_error: str | None = None
    policy_event: str | None = None
    seconds: float = 0.0


@dataclass
class Controller:
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
    last_good_tick: float | None = None
    role: str = "starting"
    startup_grace: float = STARTUP_GRACE
    _checked: set[str] = field(default_factory=set)
    _first_tick: float | None = None
    _broker_applied: BrokerOptions | None = None
    # The stored drain marks of pools whose drains are not followed yet (the backend failed): kept, and retried.
    _unresumed: dict[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)
    _pools: tuple[PoolPolicy, ...] = ()  # the last tick's, for the state written once more at stop()

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
        dry_run = policy.dry_run if self.dry_run is None else self.dry_run
        actuator = Actuator(self.backend, self.metrics, dry_run=dry_run)

        self._pools = tuple(policy.pools)
        reports = tuple(
            self._reconcile_isolated(pool, queues, metric_error, actuator, started) for pool in policy.pools
        )
        if self._still_leading("write the pool state"):
            try:
                self.store.save({r.decision.pool: r.decision.state for r in reports})
            except StateFencedError as exc:
                logger.warning("{}; another replica leads now", exc)
                self.states = None
            except StateStoreError as exc:
                # Kept in memory; the next successful write catches up. Only a restart in between loses it.
                logger.bind(error=str(exc)).error("{}; keeping it in memory", exc)
        if self.fence is not None and self.fence.lost is not None:
            # Another replica may have acted since: what this one holds in memory is stale.
            self.states = None
        seconds = self.clock() - started
        self.metrics.tick_duration.observe(seconds)
        if metric_error is None:
            self.last_good_tick = self.clock()
            self.metrics.last_good_tick.set(self.last_good_tick)
        return TickReport(
            role="leader", at=started, pools=reports, metric_error=metric_error, policy_event=event, seconds=seconds
        )

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
        self.metrics.leader.set(1 if leader else 0)
        return leader

    def _still_leading(self, what: str) -> bool:
        if self.fence is None:
            return True
        try:
            self.fence.check(what)
        except LeaseLostError:
            return False
        return True

    def _resume_drains(self, policy: Policy) -> None:
        """Leadership (re)starts: take over the stops the previous leader had under way (from the state);
        pools whose drains could not be taken over yet are tried again at each tick."""
        for pool in policy.pools:
            marks = self._unresumed.get(pool.name)
            if not marks:
                continue
            try:
                self.backend.resume_drains(pool, marks)
            except BackendError as exc:
                # Kept in the state (_with_drain_marks): the backend's own marks do not list them yet.
                logger.bind(pool=pool.name, error=str(exc)).warning(
                    "pool {}: cannot resume the drains of {} replica(s) yet: {}", pool.name, len(marks), exc
                )
                continue
            del self._unresumed[pool.name]

    def _with_start_backoff(self, pool: PoolPolicy, state: PoolState) -> PoolState:
        with suppress(BackendError):  # no backend for the pool's kind: keep what the state says
            return replace(state, backoff=self.backend.start_backoff(pool), standbys=self.backend.standby_marks(pool))
        return state

    def _with_drain_marks(self, pool: PoolPolicy, state: PoolState) -> PoolState:
        try:
            marks = self.backend.drain_marks(pool)
        except BackendError:
            return state  # keep the last known marks rather than forget a stop under way
        stored = self._unresumed.get(pool.name)
        if stored:  # stops another leader began, not followed yet: the state is their only record
            marks = tuple(sorted({**dict(stored), **dict(marks)}.items()))[:MAX_DRAINING]
        return state if marks == state.draining else replace(state, draining=marks)

    def _configure_source(self, policy: Policy) -> None:
        # The policy's `broker:` block (key prefix, priority steps...) may change with a reload.
        if policy.broker == self._broker_applied:
            return
        reconfigure = getattr(self.source, "reconfigure", None)
        if callable(reconfigure):
            reconfigure(policy.broker)
        self._broker_applied = policy.broker

    def _observe(self, policy: Policy) -> tuple[dict[str, QueueStats], str | None]:
        try:
            queues = self.source.observe(policy.queues)
        except SourceError as exc:
            self.metrics.source_errors.inc()
            logger.bind(error=str(exc)).error("metric source failed: {}; every pool holds this tick", exc)
            return {}, str(exc)
        self.metrics.observe_queues(queues.values())
        return queues, None

    def _status(self, pool: PoolPolicy) -> tuple[TargetStatus | None, str | None]:
        try:
            if pool.name not in self._checked:
                self.backend.check(pool)
                self._checked.add(pool.name)
            return self.backend.status(pool), None
        except BackendError as exc:
            self._report_backend_error(pool, exc)
            return None, str(exc)

    def _replace_unhealthy(self, pool: PoolPolicy, status: TargetStatus) -> TargetStatus:
        try:
            replaced = self.backend.replace_unhealthy(pool)
        except BackendError as exc:
            self._report_backend_error(pool, exc)
            return status
        if not replaced:
            return status
        # Drained like scale-down victims: no longer capacity, still running (counted toward max) until stopped.
        return replace(status, running=max(0, status.running - replaced), draining=status.draining + replaced)

    def _report_backend_error(self, pool: PoolPolicy, exc: BackendError) -> None:
        log = logger.bind(pool=pool.name, error=str(exc))
        if isinstance(exc, LeaseLostError):
            log.info("pool {}: {}; holding", pool.name, exc)  # the fence has said it once, as a warning
            return
        if isinstance(exc, TargetNotFoundError) and self._starting_up():
            log.warning("pool {}: waiting for its target to appear ({}); holding", pool.name, exc)
            return
        self.metrics.backend_errors.labels(pool.name).inc()
        log.error("pool {}: {}; holding", pool.name, exc)

    def _starting_up(self) -> bool:
        return self._first_tick is not None and self.clock() - self._first_tick < self.startup_grace

    def _reconcile_isolated(
        self,
        pool: PoolPolicy,
        queues: dict[str, QueueStats],
        metric_error: str | None,
        actuator: Actuator,
        now: float,
    ) -> PoolReport:
        """`_reconcile`, with anything unexpected confined to this pool: it holds, says why, the others go on."""
        try:
            return self._reconcile(pool, queues, metric_error, actuator, now)
        except Exception as exc:
            self.metrics.pool_errors.labels(pool.name).inc()
            logger.opt(exception=exc).bind(pool=pool.name, error=str(exc)).error(
                "pool {}: unexpected error ({}: {}); holding this tick", pool.name, type(exc).__name__, exc
            )
            assert self.states is not None
            state = self.states.get(pool.name, PoolState())
            reason = f"internal error ({type(exc).__name__}: {exc}); holding"
            return PoolReport(decision=Decision(pool.name, None, None, reason, state), queues=())

    def _reconcile(
        self,
        pool: PoolPolicy,
        queues: dict[str, QueueStats],
        metric_error: str | None,
        actuator: Actuator,
        now: float,
    ) -> PoolReport:
        assert self.states is not None
        status, backend_error = self._status(pool)
        if status is not None and pool.enabled and not actuator.dry_run:
            status = self._replace_unhealthy(pool, status)
        pool_queues = tuple(queues[q] for q in pool.queues if q in queues)
        observation = Observation(
            queues=pool_queues,
            current=status.running if status is not None else None,
            metric_error=metric_error,
            backend_error=backend_error,
            draining=status.draining if status is not None else 0,
            standby=status.standby if status is not None else 0,
        )
        # The status may have just judged a scale-up failed: this decision already waits for its back-off.
        state = self._with_start_backoff(pool, self.states.get(pool.name, PoolState()))
        decision = decide(pool, observation, state, now)
        decision = gate(decision, status)
        if status is not None:
            self.metrics.pool_unplaceable.labels(pool.name).set(status.unplaceable)
        action = None
        if decision.acts:
            action = actuator.scale(pool, decision)
            if action.ok:
                repair = bool(decision.details.get("repair"))
                if repair:
                    logger.bind(pool=pool.name).warning(
                        "pool {}: the count was lowered from outside ({} running, {} set by this controller: a "
                        "manual scale, `compose up` re-applying the file's count, or replicas that exited); "
                        "restored to {}", pool.name, decision.current, decision.state.target, decision.desired,
                    )
                state = decision.state.after_action(decision.direction, now, decision.desired, repair=repair)
                decision = replace(decision, state=state)
            elif action.error:
                # The reason says what stopped it (e.g. a back-off), in the log line and in `status`.
                decision = replace(decision, reason=f"{decision.reason}; not done: {action.error}")
        decision = replace(decision, state=self._with_start_backoff(pool, self._with_drain_marks(pool, decision.state)))
        self.states[pool.name] = decision.state
        self.metrics.observe_decision(decision)
        log_decision(decision, pool_queues, action)
        return PoolReport(decision=decision, queues=pool_queues, action=action)

    def readiness(self, interval: float) -> tuple[bool, dict[str, Any]]:
        """Ready when leader or standby and the last good tick is younger than three intervals."""
        age = None if self.last_good_tick is None else max(0.0, self.clock() - self.last_good_tick)
        ready = self.role in ("leader", "standby") and age is not None and age < 3 * interval
        return ready, {"role": self.role, "last_good_tick_age_s": None if age is None else round(age, 3)}

    def stop(self) -> None:
        """Step down: the stops under way go into the state once more (the next leader resumes them, so the
        process need not wait for them), then the lock is released."""
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
