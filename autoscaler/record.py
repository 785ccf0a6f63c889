"""Recording live traffic: one JSON line per tick with what was observed, for `autoscaler simulate`.

A line: {"t": epoch seconds, "queues": {name: {"waiting", "unacked", "latency_s"}},
"pools": {name: {"current", "desired"}}}. Only observations drive a replay; `desired` is there to
compare what the live loop decided with what a replay decides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from autoscaler.loop import TickReport

__all__ = ["TraceRecorder", "tick_record"]


def tick_record(report: TickReport) -> dict[str, Any] | None:
    """The trace line for one leader tick, or None for a standby tick, one without metrics, or an early
    evaluation (of some pools only: a replay steps every pool at the interval)."""
    if report.role != "leader" or report.metric_error is not None or report.trigger != "interval":
        return None
    queues: dict[str, Any] = {}
    pools: dict[str, Any] = {}
    for pool in report.pools:
        for q in pool.queues:
            queues[q.name] = {"waiting": q.waiting, "unacked": q.unacked, "latency_s": q.latency_s}
        pools[pool.decision.pool] = {"current": pool.decision.current, "desired": pool.decision.desired}
    return {"t": round(report.at, 3), "queues": queues, "pools": pools}


class TraceRecorder:
    """Appends trace lines to a file, flushed per line so a killed controller loses at most one tick."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] = self.path.open("a", encoding="utf-8")

    def write(self, report: TickReport) -> None:
        line = tick_record(report)
        if line is None:
            return
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
