"""The metric source protocol: one call per tick returns the stats of every queue asked for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from autoscaler.policy.model import BrokerOptions
from autoscaler.types import QueueStats

__all__ = ["BrokerStats", "BrokerStatsReader", "MetricSource", "SourceError", "WorkerBeat"]


class SourceError(Exception):
    """The source could not be read (after its own retries); the tick holds every pool and says why."""


class MetricSource(Protocol):
    def observe(self, queues: Sequence[str]) -> dict[str, QueueStats]:
        """Stats for each queue in `queues`, read in one round trip; raises SourceError."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


@dataclass(frozen=True, slots=True)
class WorkerBeat:
    """One worker's last heartbeat (autoscaler.celery's worker helper): when, how often, its memory."""

    at: float  # the worker's clock, Unix seconds
    every: float  # its heartbeat interval, seconds
    memory: int | None  # its container's memory in use, bytes (None: unknown)
    limit: int | None  # its container's memory limit, bytes (None: none, or unknown)


@dataclass(frozen=True, slots=True)
class BrokerStats:
    """What one stats read found. `problems` say what was refused and where; the rest was read."""

    used_memory: int | None = None
    maxmemory: int | None = None  # 0: the broker has no limit
    tasks: dict[str, dict[tuple[str, str], int]] = field(default_factory=dict)  # queue -> (state, name) -> n
    workers: dict[str, dict[str, WorkerBeat]] = field(default_factory=dict)  # queue -> hostname -> beat
    problems: tuple[tuple[str, str, str], ...] = ()  # (queue or "", kind, sentence)


class BrokerStatsReader(Protocol):
    def read(self, queues: Sequence[str], broker: BrokerOptions) -> BrokerStats:
        """Broker memory, task counts and worker beats of `queues`, in one round trip; raises SourceError."""
        ...

    def close(self) -> None: ...
