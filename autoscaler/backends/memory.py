"""An in-memory backend: replica counts in a dict. Used by the simulator and by tests of the loop."""

from __future__ import annotations

from dataclasses import dataclass, field

from autoscaler.backends.base import BackendError, TargetNotFoundError, TargetStatus
from autoscaler.policy.model import PoolPolicy
from autoscaler.types import NO_STANDBY, StandbyPlan, StartBackoffState

__all__ = ["MemoryBackend"]


@dataclass
class MemoryBackend:
    """Holds a replica count per target service; `fail_with` makes every call raise, as a dead daemon would."""

    replicas: dict[str, int] = field(default_factory=dict)
    actions: list[tuple[str, int, int]] = field(default_factory=list)
    fail_with: str | None = None
    # Warm standbys per target service, as counts: booted at once, activated at once (the simulator's model).
    standbys: dict[str, int] = field(default_factory=dict)

    def check(self, pool: PoolPolicy) -> None:
        self._maybe_fail()
        if pool.target.service not in self.replicas:
            raise TargetNotFoundError(f"{pool.target.kind} service {pool.target.service!r} does not exist")

    def status(self, pool: PoolPolicy) -> TargetStatus:
        self.check(pool)
        return TargetStatus(running=self.replicas[pool.target.service],
                            standby=self.standbys.get(pool.target.service, 0))

    def scale(self, pool: PoolPolicy, *, current: int, desired: int, standby: StandbyPlan = NO_STANDBY) -> None:
        self.check(pool)
        service = pool.target.service
        if standby:
            self.standbys[service] = max(0, self.standbys.get(service, 0) + standby.boot + standby.to_standby
                                         - standby.activate - standby.retire)
        if standby and desired == current:
            return  # standbys only: the count holds
        self.replicas[service] = desired
        self.actions.append((pool.name, current, desired))

    def drain_marks(self, pool: PoolPolicy) -> tuple[tuple[str, float], ...]:  # noqa: ARG002 - protocol
        return ()

    def resume_drains(self, pool: PoolPolicy, marks: tuple[tuple[str, float], ...]) -> None:  # noqa: ARG002
        return None

    def standby_marks(self, pool: PoolPolicy) -> tuple[tuple[str, str], ...]:  # noqa: ARG002 - protocol
        return ()

    def resume_standbys(self, pool: PoolPolicy, marks: tuple[tuple[str, str], ...]) -> None:  # noqa: ARG002
        return None

    def start_backoff(self, pool: PoolPolicy) -> StartBackoffState:  # noqa: ARG002 - protocol
        return StartBackoffState()

    def resume_start_backoff(self, pool: PoolPolicy, saved: StartBackoffState) -> None:  # noqa: ARG002
        return None

    def replace_unhealthy(self, pool: PoolPolicy) -> int:  # noqa: ARG002 - protocol
        return 0

    def close(self) -> None:
        return None

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            raise BackendError(self.fail_with)
