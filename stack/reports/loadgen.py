"""Load shapes for the load generator: when (seconds after the start) each task is published.

- no shape: everything at once, as fast as the broker takes it;
- ``rate``: a constant rate (tasks per second);
- ``ramp`` ``FROM:TO:SECONDS``: the rate grows (or falls) linearly from FROM to TO over SECONDS, then
  holds TO until ``count`` tasks are out;
- ``burst`` ``SIZE[:EVERY]``: SIZE tasks back to back every EVERY seconds (default 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Burst", "Ramp", "parse_burst", "parse_ramp", "send_offsets"]


@dataclass(frozen=True)
class Ramp:
    """Linear rate change from ``start`` to ``end`` tasks/s over ``seconds``."""

    start: float
    end: float
    seconds: float


@dataclass(frozen=True)
class Burst:
    """``size`` tasks at once, every ``every`` seconds."""

    size: int
    every: float


def parse_ramp(text: str) -> Ramp:
    """``FROM:TO:SECONDS`` -> Ramp."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"ramp {text!r}: expected FROM:TO:SECONDS")
    start, end, seconds = (float(part) for part in parts)
    if start < 0 or end < 0 or seconds <= 0 or (start == 0 and end == 0):
        raise ValueError(f"ramp {text!r}: rates must be >= 0 (not both 0) and SECONDS > 0")
    return Ramp(start, end, seconds)


def parse_burst(text: str) -> Burst:
    """``SIZE[:EVERY]`` -> Burst."""
    size_text, _, every_text = text.partition(":")
    size = int(size_text)
    every = float(every_text) if every_text else 1.0
    if size <= 0 or every <= 0:
        raise ValueError(f"burst {text!r}: SIZE and EVERY must be > 0")
    return Burst(size, every)


def _ramp_offset(index: int, ramp: Ramp) -> float:
    """Time at which ``index`` tasks have been sent under the ramp (solves N(t) = index)."""
    slope = (ramp.end - ramp.start) / ramp.seconds
    sent_during_ramp = (ramp.start + ramp.end) / 2.0 * ramp.seconds
    if index >= sent_during_ramp:
        if ramp.end == 0:
            return ramp.seconds
        return ramp.seconds + (index - sent_during_ramp) / ramp.end
    if slope == 0:
        return index / ramp.start
    # N(t) = start*t + slope*t^2/2  ->  t = (-start + sqrt(start^2 + 2*slope*N)) / slope
    return (-ramp.start + math.sqrt(max(ramp.start**2 + 2.0 * slope * index, 0.0))) / slope


def send_offsets(
    count: int, *, rate: float | None = None, ramp: Ramp | None = None, burst: Burst | None = None
) -> list[float]:
    """Publish time of each of ``count`` tasks, in seconds after the start (non-decreasing)."""
    if count < 0:
        raise ValueError("count must be >= 0")
    if sum(shape is not None for shape in (rate, ramp, burst)) > 1:
        raise ValueError("choose at most one of rate, ramp, burst")
    if rate is not None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        return [index / rate for index in range(count)]
    if ramp is not None:
        return [_ramp_offset(index, ramp) for index in range(count)]
    if burst is not None:
        return [(index // burst.size) * burst.every for index in range(count)]
    return [0.0] * count
