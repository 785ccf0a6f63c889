"""Policy tuning: replay recorded or built-in traffic through the live loop's decisions, on simulated time.

`traces` reads recordings and CSVs, `scenarios` makes hours of traffic, `engine` drives `Controller.tick()`
over them (open loop, or closed loop with `workload` and `queueing`), `summary` sums up, `charts` draws
(needs matplotlib, imported only from there) and `cli` is the `autoscaler simulate` command.
"""

from __future__ import annotations

from autoscaler.simulate.engine import Replay, TickRecord, replay
from autoscaler.simulate.scenarios import SCENARIOS, scenario_trace
from autoscaler.simulate.summary import PoolSummary, compare_table, summarize
from autoscaler.simulate.traces import Trace, TraceError, read_trace
from autoscaler.simulate.workload import PoolCapacity, estimate_throughput, resolve_capacity

__all__ = [
    "SCENARIOS",
    "PoolCapacity",
    "PoolSummary",
    "Replay",
    "TickRecord",
    "Trace",
    "TraceError",
    "compare_table",
    "estimate_throughput",
    "read_trace",
    "replay",
    "resolve_capacity",
    "scenario_trace",
    "summarize",
]
