"""One pool's pass within a tick: its replicas' status -> decide -> act -> the state it keeps, plus the
bookkeeping the state carries between ticks (the stops under way, the start back-off).

A mixin of `loop.Controller`, which owns the fields named below; kept apart so the tick's orchestration
(leadership, the one metric read, the one state write) reads on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from loguru import logger

from autoscaler.actions import ActionResult, Actuator
from autoscaler.backends.base import Backend, BackendError, LeaseLostError, TargetNotFoundError, TargetStatus
from autoscaler.gate import gate
from autoscaler.inflight import ActionsInFlight
from autoscaler.leader import Fence
from autoscaler.observability.logs import log_decision
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.decide import decide
from autoscaler.policy.model import Policy, PoolPolicy
from autoscaler.policy.trigger import wake_threshold
from autoscaler.sources.queue_watch import WatchTarget
from autoscaler.state_store import StateStoreError
from autoscaler.types import MAX_DRAINING, Decision, Direction, Observation, PoolState, QueueStats, StandbyPlan

if TYPE_CHECKING:
    from autoscaler.loop import StateStore

__all__ = ["PoolReconcile", "PoolReport"]


@dataclass(frozen=True, slots=True)
class PoolReport:
    decision: Decision
    queues: tuple[QueueStats, ...]
    action: ActionResult | None = None


class PoolReconcile:
    """The per-pool half of `Controller` (its fields are declared there)."""

    backend: Backend
    metrics: Metrics
    store: StateStore
    fence: Fence | None
    clock: Callable[[], float]
    states: dict[str, PoolState] | None
    actions: ActionsInFlight | None
    _watch: dict[str, WatchTarget]
    startup_grace: float
    _checked: set[str]
    _first_tick: float | None
    _unresumed: dict[str, tuple[tuple[str, float], ...]]

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
        *,
        early: bool = False,
    ) -> PoolReport:
        """`_reconcile`, with anything unexpected confined to this pool: it holds, says why, the others go on."""
        try:
            if self.actions is not None and self.actions.busy(pool.name):
                # Its action's own state write records it; deciding again now would act on a count in flux.
                return self._holding(pool, "action under way: holding")
            return self._reconcile(pool, queues, metric_error, actuator, now, early=early)
        except Exception as exc:
            self.metrics.pool_errors.labels(pool.name).inc()
            logger.opt(exception=exc).bind(pool=pool.name, error=str(exc)).error(
                "pool {}: unexpected error ({}: {}); holding this tick", pool.name, type(exc).__name__, exc
            )
            return self._holding(pool, f"internal error ({type(exc).__name__}: {exc}); holding")

    def _holding(self, pool: PoolPolicy, reason: str) -> PoolReport:
        """A pool left as it is this pass: no count read, its stored state unchanged."""
        assert self.states is not None
        state = self.states.get(pool.name, PoolState())
        return PoolReport(decision=Decision(pool.name, None, None, reason, state), queues=())

    def _reconcile(
        self,
        pool: PoolPolicy,
        queues: dict[str, QueueStats],
        metric_error: str | None,
        actuator: Actuator,
        now: float,
        *,
        early: bool = False,
    ) -> PoolReport:
        assert self.states is not None
        status, backend_error = self._status(pool)
        if status is not None and pool.enabled and not actuator.dry_run and not early:
            # Not on an early pass: anyone who can push to a queue may wake one, and a replacement is a drain.
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
        if early and decision.direction is Direction.DOWN:
            # Woken by the queue watcher: only a scale-up is urgent; a scale-down keeps the interval's rhythm.
            decision = replace(decision, desired=decision.current, standby=StandbyPlan(),
                               reason=f"{decision.reason}; a scale-down waits for the next tick")
        elif early and decision.direction is Direction.HOLD and decision.standby:
            decision = replace(decision, standby=StandbyPlan())  # boots and retires keep the tick's rhythm too
        if status is not None:
            self.metrics.pool_unplaceable.labels(pool.name).set(status.unplaceable)
        action = None
        if decision.acts and self.actions is not None and not actuator.dry_run:
            return self._act_in_background(pool, decision, pool_queues, actuator, now)
        if decision.acts:
            action = actuator.scale(pool, decision)
        decision = self._settle(pool, decision, action, now)
        self.states[pool.name] = decision.state
        self._remember_for_watch(pool, decision.current if action is None or not action.ok else decision.desired,
                                 pool_queues)
        self.metrics.observe_decision(decision)
        log_decision(decision, pool_queues, action)
        return PoolReport(decision=decision, queues=pool_queues, action=action)

    def _settle(self, pool: PoolPolicy, decision: Decision, action: ActionResult | None, now: float) -> Decision:
        """The decision once its action (if any) ended: the state it leaves, its reason if it was not done."""
        if action is not None and action.ok:
            repair = bool(decision.details.get("repair"))
            if repair:
                logger.bind(pool=pool.name).warning(
                    "pool {}: the count was lowered from outside ({} running, {} set by this controller: a "
                    "manual scale, `compose up` re-applying the file's count, or replicas that exited); "
                    "restored to {}", pool.name, decision.current, decision.state.target, decision.desired,
                )
            state = decision.state.after_action(decision.direction, now, decision.desired, repair=repair)
            decision = replace(decision, state=state)
        elif action is not None and action.error:
            # The reason says what stopped it (e.g. a back-off), in the log line and in `status`.
            decision = replace(decision, reason=f"{decision.reason}; not done: {action.error}")
        return replace(decision, state=self._with_start_backoff(pool, self._with_drain_marks(pool, decision.state)))

    def _act_in_background(
        self, pool: PoolPolicy, decision: Decision, pool_queues: tuple[QueueStats, ...], actuator: Actuator,
        now: float,
    ) -> PoolReport:
        """Start the action on the pool's own thread and report the decision now; the thread records the
        state it leaves (after_action: the cooldown, the target) and writes it, fenced as the tick's write is."""
        assert self.actions is not None
        assert self.states is not None
        with self.actions.lock:
            # Set before the thread starts: a quick action's state must not be overwritten by this one.
            self.states[pool.name] = self._settle(pool, decision, None, now).state
            self._watch.pop(pool.name, None)

        # The action's fence checks (and its state write) fail once the lease was lost and taken again: another
        # replica may have acted in between, and this decision and its state are older than that.
        term = self.fence.term() if self.fence is not None else 0
        fence = self.fence

        def work() -> None:
            try:
                with fence.acting_under(term) if fence is not None else nullcontext():
                    action = actuator.scale(pool, decision)
                    with self.actions_lock():
                        # Read before the term: a lease taken again since replaced this dict with the stored one.
                        states = self.states
                        if fence is not None and fence.stale():
                            logger.bind(pool=pool.name).warning(
                                "pool {}: the action begun under an earlier leader lease ended; its state is not "
                                "recorded (the lease was lost and taken again: the stored state is newer)", pool.name
                            )
                            return
                        settled = self._settle(pool, decision, action, now)
                        if states is not None:
                            states[pool.name] = settled.state
                        self._remember_for_watch(pool, decision.desired if action.ok else decision.current,
                                                 pool_queues)
                        if self._still_leading("write the pool state"):
                            self.store.save({pool.name: settled.state})
            except StateStoreError as exc:
                logger.bind(pool=pool.name, error=str(exc)).error("{}; the next tick writes it", exc)
            except Exception as exc:
                self.metrics.pool_errors.labels(pool.name).inc()
                logger.opt(exception=exc).bind(pool=pool.name, error=str(exc)).error(
                    "pool {}: unexpected error in its action ({}: {})", pool.name, type(exc).__name__, exc
                )

        self.actions.start(pool.name, work)
        self.metrics.observe_decision(decision)
        log_decision(decision, pool_queues, None)
        return PoolReport(decision=decision, queues=pool_queues)

    def actions_lock(self) -> AbstractContextManager[object]:
        """The lock a pool's state is changed and written under (a no-op lock without background actions)."""
        return self.actions.lock if self.actions is not None else nullcontext()

    def _remember_for_watch(self, pool: PoolPolicy, current: int | None, pool_queues: tuple[QueueStats, ...]) -> None:
        """What the queue watcher compares with until this pool's next read (see sources/queue_watch.py)."""
        threshold = None if len(pool_queues) != len(pool.queues) or any(q.error for q in pool_queues) else (
            wake_threshold(pool, current, waiting=sum(q.waiting for q in pool_queues),
                           unacked=sum(q.unacked for q in pool_queues))
        )
        if threshold is None:
            self._watch.pop(pool.name, None)
            return
        level = sum(q.waiting for q in pool_queues)
        self._watch[pool.name] = WatchTarget(tuple(pool.queues), threshold, level)

    def _still_leading(self, what: str) -> bool:
        if self.fence is None:
            return True
        try:
            self.fence.check(what)
        except LeaseLostError:
            return False
        return True
