"""The one wrapper every backend action goes through: dry-run, the log line, counters and latency."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from autoscaler.backends.base import Backend, BackendError, LeaseLostError
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.model import PoolPolicy
from autoscaler.types import Decision, Direction

__all__ = ["ActionResult", "Actuator"]


@dataclass(frozen=True, slots=True)
class ActionResult:
    """`ok` is True when the backend scaled (never in dry-run); `error` says why not otherwise."""

    ok: bool
    dry_run: bool
    error: str | None
    seconds: float


class Actuator:
    def __init__(
        self,
        backend: Backend,
        metrics: Metrics,
        *,
        dry_run: bool,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.dry_run = dry_run
        self._clock = clock
        self._wall_clock = wall_clock

    def scale(self, pool: PoolPolicy, decision: Decision) -> ActionResult:
        """Carry out a decision that changes the count or the warm standbys; a plain hold must not come here."""
        direction = decision.direction
        if not decision.acts or decision.current is None or decision.desired is None:
            raise ValueError(f"pool {pool.name}: nothing to act on ({decision.reason})")
        log = logger.bind(pool=pool.name, current=decision.current, desired=decision.desired, direction=direction)
        if direction is Direction.HOLD:
            return self._standbys_only(pool, decision)
        if self.dry_run:
            log.info(
                "dry-run: would scale {} from {} to {}: {}",
                pool.name,
                decision.current,
                decision.desired,
                decision.reason,
            )
            self.metrics.actions.labels(pool.name, direction, "dry_run").inc()
            self.metrics.observe_action(pool, decision, "dry_run", self._wall_clock())
            self.metrics.count_standby_plan(pool.name, decision.standby, "dry_run")
            return ActionResult(ok=False, dry_run=True, error=None, seconds=0.0)
        started = self._clock()
        try:
            self._call_backend(pool, decision)
        except LeaseLostError as exc:
            # Not a failure of the backend: another replica leads now (the fence has said so once).
            self.metrics.actions.labels(pool.name, direction, "lease_lost").inc()
            self.metrics.count_standby_plan(pool.name, decision.standby, "lease_lost")
            log.info("not scaling {} from {} to {}: {}", pool.name, decision.current, decision.desired, exc)
            return ActionResult(ok=False, dry_run=False, error=str(exc), seconds=self._clock() - started)
        except BackendError as exc:
            seconds = self._clock() - started
            self.metrics.actions.labels(pool.name, direction, "error").inc()
            self.metrics.count_standby_plan(pool.name, decision.standby, "error")
            self.metrics.backend_errors.labels(pool.name).inc()
            log.bind(error=str(exc)).error(
                "failed to scale {} from {} to {}: {}; holding", pool.name, decision.current, decision.desired, exc
            )
            return ActionResult(ok=False, dry_run=False, error=str(exc), seconds=seconds)
        seconds = self._clock() - started
        self.metrics.actions.labels(pool.name, direction, "ok").inc()
        self.metrics.count_standby_plan(pool.name, decision.standby, "ok")
        self.metrics.action_duration.labels(pool.name, direction).observe(seconds)
        self.metrics.observe_action(pool, decision, "ok", self._wall_clock())
        log.bind(seconds=round(seconds, 3)).info(
            "scaled {} from {} to {} in {:.2f}s: {}",
            pool.name,
            decision.current,
            decision.desired,
            seconds,
            decision.reason,
        )
        return ActionResult(ok=True, dry_run=False, error=None, seconds=seconds)

    def _call_backend(self, pool: PoolPolicy, decision: Decision) -> None:
        assert decision.current is not None
        assert decision.desired is not None
        if decision.standby:
            self.backend.scale(pool, current=decision.current, desired=decision.desired, standby=decision.standby)
        else:  # backends without standbys keep the call they always had
            self.backend.scale(pool, current=decision.current, desired=decision.desired)

    def _standbys_only(self, pool: PoolPolicy, decision: Decision) -> ActionResult:
        """Booting or retiring warm standbys while the count holds: an action of its own, logged and counted."""
        plan = decision.standby
        log = logger.bind(pool=pool.name, standby=plan.describe())
        if self.dry_run:
            log.info("dry-run: would change the standbys of {} ({}): {}", pool.name, plan.describe(), decision.reason)
            self.metrics.count_standby_plan(pool.name, plan, "dry_run")
            return ActionResult(ok=False, dry_run=True, error=None, seconds=0.0)
        started = self._clock()
        try:
            self._call_backend(pool, decision)
        except BackendError as exc:
            outcome = "lease_lost" if isinstance(exc, LeaseLostError) else "error"
            self.metrics.count_standby_plan(pool.name, plan, outcome)
            if outcome == "error":
                self.metrics.backend_errors.labels(pool.name).inc()
            log.bind(error=str(exc)).log(
                "INFO" if outcome == "lease_lost" else "ERROR", "standbys of {} not changed ({}): {}",
                pool.name, plan.describe(), exc,
            )
            return ActionResult(ok=False, dry_run=False, error=str(exc), seconds=self._clock() - started)
        seconds = self._clock() - started
        self.metrics.count_standby_plan(pool.name, plan, "ok")
        log.bind(seconds=round(seconds, 3)).info(
            "standbys of {}: {} in {:.2f}s: {}", pool.name, plan.describe(), seconds, decision.reason
        )
        return ActionResult(ok=True, dry_run=False, error=None, seconds=seconds)
