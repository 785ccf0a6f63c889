"""The metric source protocol: one call per tick returns the stats of every queue asked for."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from autoscaler.types import QueueStats

__all__ = ["MetricSource", "SourceError"]


class SourceError(Exception):
    """The source could not be read (after its own retries); the tick holds every pool and says why."""


class MetricSource(Protocol):
    def observe(self, queues: Sequence[str]) -> dict[str, QueueStats]:
        """Stats for each queue in `queues`, read in one round trip; raises SourceError."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...
