"""Built-in traffic scenarios, so a policy can be tried with no recording. Deterministic; one hour each.

Each scenario is an arrival rate in tasks/s over time, the same shape for every queue but started
`STAGGER` seconds later for each further queue of the policy (cycling every three queues) so the pools'
panels do not coincide:

- `burst`:  0.1/s, then 15/s for 5 minutes from minute 10, then 0.1/s again.
- `ramp`:   0.1/s rising linearly to 12/s over 30 minutes, held 5 minutes, back to 0.1/s over 5 minutes.
- `sine`:   5 ± 4.9/s, one period every 20 minutes.
- `spiky`:  0.5/s with a 45-second spike of 20/s every 6 minutes from minute 3.

The closed loop uses the rate as the arrivals. The open loop needs depths instead: a queue's depth is
taken as `DEPTH_SECONDS` of arrivals (Little's law with a steady one-minute wait), so the depth has the
rate's shape (0.1/s -> 6 waiting, 15/s -> 900) and the oldest message is `DEPTH_SECONDS` old.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from autoscaler.simulate.traces import Trace, TraceRow
from autoscaler.types import QueueStats

__all__ = ["DEPTH_SECONDS", "DURATION", "SCENARIOS", "STAGGER", "scenario_rate", "scenario_trace"]

DURATION = 3600.0
STAGGER = 300.0
DEPTH_SECONDS = 60.0
_BASE = 0.1


def _burst(t: float) -> float:
    return 15.0 if 600.0 <= t < 900.0 else _BASE


def _ramp(t: float) -> float:
    peak = 12.0
    if t < 0 or t >= 2400.0:
        return _BASE
    if t < 1800.0:
        return _BASE + (peak - _BASE) * t / 1800.0
    if t < 2100.0:
        return peak
    return peak - (peak - _BASE) * (t - 2100.0) / 300.0


def _sine(t: float) -> float:
    return 5.0 + 4.9 * math.sin(2 * math.pi * t / 1200.0)


def _spiky(t: float) -> float:
    in_spike = t >= 180.0 and (t - 180.0) % 360.0 < 45.0
    return 20.0 if in_spike else 0.5


SCENARIOS: dict[str, Callable[[float], float]] = {
    "burst": _burst, "ramp": _ramp, "sine": _sine, "spiky": _spiky
}


def scenario_rate(name: str, *, queues: Sequence[str]) -> Callable[[str, float], float]:
    """The arrival rate (tasks/s) of scenario `name` for each of `queues` at a time; unknown queues get 0."""
    shape = SCENARIOS[name]
    delays = {q: STAGGER * (i % 3) for i, q in enumerate(queues)}

    def rate(queue: str, t: float) -> float:
        delay = delays.get(queue)
        return 0.0 if delay is None else shape(t - delay)

    return rate


def scenario_trace(name: str, *, queues: Sequence[str], step: float) -> Trace:
    """Scenario `name` sampled every `step` seconds over `DURATION`, for the open loop and the charts."""
    if name not in SCENARIOS:
        raise KeyError(name)
    rate = scenario_rate(name, queues=queues)
    rows = []
    for k in range(math.ceil(DURATION / step)):
        t = k * step
        stats = {}
        for q in queues:
            depth = round(rate(q, t) * DEPTH_SECONDS)
            stats[q] = QueueStats(q, depth, 0, DEPTH_SECONDS if depth else 0.0)
        rows.append(TraceRow(t, stats, {}, k + 1))
    return Trace(name=f"scenario {name}", kind="scenario", rows=tuple(rows), arrival_rate=rate, end=DURATION)
