"""The backend protocol: how many replicas a pool's target runs, and how to change that."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from autoscaler.policy.model import PoolPolicy
from autoscaler.types import NO_STANDBY, StandbyPlan, StartBackoffState

__all__ = ["OWNER_LABEL", "Backend", "BackendError", "LeaseLostError", "TargetNotFoundError", "TargetStatus"]

# The opt-in label a container or service must carry, with the pool's name as value, before any backend
# touches it: a look-alike without it is never scaled.
OWNER_LABEL = "autoscaler.pool"


class BackendError(Exception):
    """The backend could not answer or act (after its own retries); the pool holds and the loop goes on."""


class LeaseLostError(BackendError):
    """This controller no longer holds the leader lease: it makes no further Docker call (another may act)."""


class TargetNotFoundError(BackendError):
    """The pool's target does not exist yet (no Swarm service, or no Compose container to clone).

    Right after `compose up` or `stack deploy` this is a start-up race that resolves itself within seconds;
    the loop reports it as a warning during its first minute and as an error after that.
    """


@dataclass(frozen=True, slots=True)
class TargetStatus:
    """What a backend sees of a pool's target.

    `running` counts replicas that run and are not being stopped. `ready` is False while an earlier
    scale-up is still in flight (containers starting); the loop then holds a scale-up instead of acting on a
    count that is about to change. `down_ready` says the same for a scale-down (None: as `ready`; Swarm
    always allows one). `wanted` is the count the platform was asked for when it keeps its own (Swarm's
    replica spec), `unplaceable` the replicas it cannot place (with the reason in `detail`). `draining` counts
    the replicas being stopped that still run (a warm shutdown lasts up to the pool's stop_timeout): not in
    `running`, but counted toward `max`.
    """

    running: int
    ready: bool = True
    detail: str = ""
    down_ready: bool | None = None
    wanted: int | None = None
    unplaceable: int = 0
    draining: int = 0
    # Warm standbys (not in `running`, counted toward max + warm) and the memory they hold (their limits).
    standby: int = 0
    standby_memory: int = 0

    @property
    def may_scale_down(self) -> bool:
        return self.ready if self.down_ready is None else self.down_ready


class Backend(Protocol):
    def check(self, pool: PoolPolicy) -> None:
        """Raise BackendError saying what is wrong if the pool's target is missing or not opted in."""
        ...

    def status(self, pool: PoolPolicy) -> TargetStatus:
        """The target's current replicas; raises BackendError."""
        ...

    def scale(self, pool: PoolPolicy, *, current: int, desired: int, standby: StandbyPlan = NO_STANDBY) -> None:
        """Bring the target from `current` to `desired` replicas, activating, returning, booting or retiring warm
        standbys as `standby` says (a backend without them refuses a plan); raises BackendError."""
        ...

    def standby_marks(self, pool: PoolPolicy) -> tuple[tuple[str, str], ...]:
        """The pool's standbys that are active or whose change is unconfirmed (kept in the pool's state)."""
        ...

    def resume_standbys(self, pool: PoolPolicy, marks: tuple[tuple[str, str], ...]) -> None:
        """Take over what an earlier controller recorded of the pool's standbys (`marks`, from its state)."""
        ...

    def drain_marks(self, pool: PoolPolicy) -> tuple[tuple[str, float], ...]:
        """The pool's replicas being stopped now, each with the time its grace ends (kept in the pool's state)."""
        ...

    def resume_drains(self, pool: PoolPolicy, marks: tuple[tuple[str, float], ...]) -> None:
        """Take over the stops an earlier controller began (`marks` from the pool's state): those still
        running are drained (not counted, not chosen again) and removed once stopped. Ids that are not
        replicas of the pool's target are ignored."""
        ...

    def start_backoff(self, pool: PoolPolicy) -> StartBackoffState:
        """The pool's back-off after failed starts, and the scale-up being judged (kept in the pool's state)."""
        ...

    def resume_start_backoff(self, pool: PoolPolicy, saved: StartBackoffState) -> None:
        """Take over the back-off an earlier controller kept in the pool's state (validated; clamped here)."""
        ...

    def replace_unhealthy(self, pool: PoolPolicy) -> int:
        """Drain replicas that stay unhealthy (the platform does not restart them), so that the loop's repair
        replaces them; how many were taken out of the count. Called only when the pool may act (not paused,
        not in dry-run)."""
        ...

    def close(self) -> None:
        """Release clients."""
        ...
