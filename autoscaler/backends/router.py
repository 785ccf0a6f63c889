"""One Backend over several: dispatches each pool to the Compose or Swarm backend its target names.

The loop holds a single Backend; a policy may mix Compose and Swarm pools.
"""

from __future__ import annotations

from autoscaler.backends.base import Backend, BackendError, TargetStatus
from autoscaler.policy.model import PoolPolicy
from autoscaler.types import NO_STANDBY, StandbyPlan, StartBackoffState

__all__ = ["BackendRouter"]


class BackendRouter:
    """Implements the Backend protocol by routing on `pool.target.kind`; a kind left None is refused."""

    def __init__(self, *, compose: Backend | None, swarm: Backend | None) -> None:
        self._backends: dict[str, Backend | None] = {"compose": compose, "swarm": swarm}

    def check(self, pool: PoolPolicy) -> None:
        self._for(pool).check(pool)

    def status(self, pool: PoolPolicy) -> TargetStatus:
        return self._for(pool).status(pool)

    def scale(self, pool: PoolPolicy, *, current: int, desired: int, standby: StandbyPlan = NO_STANDBY) -> None:
        if standby:
            self._for(pool).scale(pool, current=current, desired=desired, standby=standby)
        else:
            self._for(pool).scale(pool, current=current, desired=desired)

    def standby_marks(self, pool: PoolPolicy) -> tuple[tuple[str, str], ...]:
        return self._for(pool).standby_marks(pool)

    def resume_standbys(self, pool: PoolPolicy, marks: tuple[tuple[str, str], ...]) -> None:
        self._for(pool).resume_standbys(pool, marks)

    def drain_marks(self, pool: PoolPolicy) -> tuple[tuple[str, float], ...]:
        return self._for(pool).drain_marks(pool)

    def resume_drains(self, pool: PoolPolicy, marks: tuple[tuple[str, float], ...]) -> None:
        self._for(pool).resume_drains(pool, marks)

    def start_backoff(self, pool: PoolPolicy) -> StartBackoffState:
        return self._for(pool).start_backoff(pool)

    def resume_start_backoff(self, pool: PoolPolicy, saved: StartBackoffState) -> None:
        self._for(pool).resume_start_backoff(pool, saved)

    def replace_unhealthy(self, pool: PoolPolicy) -> int:
        return self._for(pool).replace_unhealthy(pool)

    def close(self) -> None:
        # Distinct backends only: both kinds may be served by one object.
        closed: list[Backend] = []
        for backend in self._backends.values():
            if backend is not None and not any(backend is seen for seen in closed):
                backend.close()
                closed.append(backend)

    def _for(self, pool: PoolPolicy) -> Backend:
        kind = pool.target.kind
        backend = self._backends.get(kind)
        if backend is None:
            raise BackendError(
                f"pool {pool.name} targets {kind} service {pool.target.service}, but no {kind} backend is "
                "configured in this controller"
            )
        return backend
