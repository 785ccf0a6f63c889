"""Traces to replay: the recorder's JSON lines or a CSV of queue depths, read into one in-memory form.

A trace is a list of rows in time order, each with the stats of every queue it covers and (for
recordings) each pool's recorded replica count. Times are seconds from the trace's first row, so a
recording made on epoch time and a hand-written CSV replay alike. Every problem found while reading is a
`TraceError` naming the file and line.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from autoscaler.types import QueueStats

__all__ = ["ArrivalRate", "Trace", "TraceError", "TraceRow", "parse_csv", "parse_jsonl", "read_trace"]

# (queue, time since start) -> tasks per second; scenarios carry one so the closed loop needs no guessing.
ArrivalRate = Callable[[str, float], float]


class TraceError(Exception):
    """A trace that cannot be replayed; the message reads `file:line: what is wrong`."""

    def __init__(self, source: str, line: int | None, message: str) -> None:
        self.source = source
        self.line = line
        self.message = message
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One observation: `t` seconds from the trace's start; `pools` holds recorded replica counts."""

    t: float
    queues: Mapping[str, QueueStats]
    pools: Mapping[str, int] = field(default_factory=dict)
    line: int = 0


@dataclass(frozen=True, slots=True)
class Trace:
    """Rows in time order. `kind` says where they came from; `arrival_rate` is set for scenarios only."""

    name: str
    kind: Literal["recording", "csv", "scenario"]
    rows: tuple[TraceRow, ...]
    arrival_rate: ArrivalRate | None = None
    end: float | None = None  # scenarios: their nominal length (the last row is one step before it)
    _times: tuple[float, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not self.rows:
            raise TraceError(self.name, None, "the trace has no data rows")
        object.__setattr__(self, "_times", tuple(r.t for r in self.rows))

    @property
    def last(self) -> float:
        return self.rows[-1].t

    @property
    def queues(self) -> tuple[str, ...]:
        """Every queue named anywhere in the trace, in order of first appearance."""
        return tuple(dict.fromkeys(q for row in self.rows for q in row.queues))

    def index_at(self, t: float, *, slack: float = 0.0) -> int:
        """Index of the latest row at or before `t` (up to `slack` later counts as on time); -1 if none."""
        return bisect.bisect_right(self._times, t + slack) - 1

    def at(self, t: float, *, slack: float = 0.0) -> TraceRow | None:
        i = self.index_at(t, slack=slack)
        return self.rows[i] if i >= 0 else None


def read_trace(path: str | Path) -> Trace:
    """Read a trace file: `.csv` as CSV, `.jsonl`/`.json`/`.ndjson` as recorder lines, else by content."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(str(p), None, f"cannot read the trace: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TraceError(str(p), None, f"not a text file ({exc.reason})") from exc
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return parse_csv(text, source=str(p))
    if suffix in (".jsonl", ".json", ".ndjson"):
        return parse_jsonl(text, source=str(p))
    parse = parse_jsonl if text.lstrip().startswith("{") else parse_csv
    return parse(text, source=str(p))


def _number(raw: object, *, source: str, line: int, what: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise TraceError(source, line, f"{what}: not a number: {raw!r}")
    try:
        value = float(raw)
    except ValueError:
        raise TraceError(source, line, f"{what}: not a number: {raw!r}") from None
    if math.isnan(value) or math.isinf(value):
        raise TraceError(source, line, f"{what}: not a finite number: {raw!r}")
    return value


def _count(raw: object, *, source: str, line: int, what: str) -> int:
    value = _number(raw, source=source, line=line, what=what)
    if value < 0:
        raise TraceError(source, line, f"{what}: negative: {raw!r}")
    if value != int(value):
        raise TraceError(source, line, f"{what}: not a whole number: {raw!r}")
    return int(value)


def _check_order(rows: list[TraceRow], t: float, *, source: str, line: int) -> None:
    if rows and t < rows[-1].t:
        last = rows[-1]
        raise TraceError(source, line, f"t goes back in time ({t:g} after {last.t:g} on line {last.line})")


def _rebase(rows: list[TraceRow]) -> tuple[TraceRow, ...]:
    # The replay starts at the first row whatever clock the trace was written on.
    start = rows[0].t if rows else 0.0
    return tuple(TraceRow(r.t - start, r.queues, r.pools, r.line) for r in rows)


def parse_csv(text: str, *, source: str = "<csv>") -> Trace:
    """`t,<queue>,<queue>,...` then one row per observation: seconds from start, waiting depth per queue.

    Blank lines and lines starting with `#` are skipped.
    """
    numbered = enumerate(text.splitlines(), start=1)
    lines = [(n, s) for n, s in numbered if s.strip() and not s.lstrip().startswith("#")]
    if not lines:
        raise TraceError(source, None, "the trace is empty (expected a header `t,<queue>,...` and rows)")
    header_line, header_text = lines[0]
    header = [h.strip() for h in next(csv.reader(io.StringIO(header_text)))]
    if not header or header[0] != "t":
        raise TraceError(source, header_line, f"the header must start with `t`, got {header_text.strip()!r}")
    queues = header[1:]
    if not queues:
        raise TraceError(source, header_line, "the header names no queue (expected `t,<queue>,...`)")
    for i, name in enumerate(queues):
        if not name:
            raise TraceError(source, header_line, f"column {i + 2} has no queue name")
        if name in queues[:i]:
            raise TraceError(source, header_line, f"queue {name!r} appears twice in the header")
    rows: list[TraceRow] = []
    for number, line_text in lines[1:]:
        values = [v.strip() for v in next(csv.reader(io.StringIO(line_text)))]
        if len(values) != len(header):
            expected = f"{len(header)} values ({', '.join(header)})"
            raise TraceError(source, number, f"expected {expected}, got {len(values)}")
        t = _number(values[0], source=source, line=number, what="column 't'")
        stats = {
            q: QueueStats(q, _count(v, source=source, line=number, what=f"column {q!r}"))
            for q, v in zip(queues, values[1:], strict=True)
        }
        _check_order(rows, t, source=source, line=number)
        rows.append(TraceRow(t, stats, {}, number))
    if not rows:
        raise TraceError(source, None, "the trace has a header but no data rows")
    return Trace(name=source, kind="csv", rows=_rebase(rows))


def _queue_stats(name: str, raw: object, *, source: str, line: int) -> QueueStats:
    if not isinstance(raw, dict):
        raise TraceError(source, line, f"queue {name!r}: expected an object with `waiting`, got {raw!r}")
    if "waiting" not in raw:
        raise TraceError(source, line, f"queue {name!r}: field 'waiting' is missing")
    waiting = _count(raw["waiting"], source=source, line=line, what=f"queue {name!r} field 'waiting'")
    unacked = _count(raw.get("unacked", 0), source=source, line=line, what=f"queue {name!r} field 'unacked'")
    latency_raw = raw.get("latency_s", 0.0)
    latency = (
        None
        if latency_raw is None
        else _number(latency_raw, source=source, line=line, what=f"queue {name!r} field 'latency_s'")
    )
    return QueueStats(name, waiting, unacked, latency)


def _pool_counts(raw: object, *, source: str, line: int) -> dict[str, int]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TraceError(source, line, f"field 'pools': expected an object, got {raw!r}")
    counts: dict[str, int] = {}
    for name, body in raw.items():
        if not isinstance(body, dict):
            raise TraceError(source, line, f"pool {name!r}: expected an object with `current`, got {body!r}")
        current = body.get("current")
        # None means the backend could not say at that tick; the row then tells nothing about this pool.
        if current is not None:
            counts[name] = _count(current, source=source, line=line, what=f"pool {name!r} field 'current'")
    return counts


def parse_jsonl(text: str, *, source: str = "<jsonl>") -> Trace:
    """The recorder's lines: `{"t": epoch, "queues": {name: {"waiting", "unacked", "latency_s"}}, ...}`."""
    rows: list[TraceRow] = []
    for number, line_text in enumerate(text.splitlines(), start=1):
        if not line_text.strip():
            continue
        try:
            raw: Any = json.loads(line_text)
        except json.JSONDecodeError as exc:
            raise TraceError(source, number, f"not valid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(raw, dict):
            raise TraceError(source, number, f"expected a JSON object, got {type(raw).__name__}")
        if "t" not in raw:
            raise TraceError(source, number, "field 't' is missing")
        t = _number(raw["t"], source=source, line=number, what="field 't'")
        queues_raw = raw.get("queues")
        if not isinstance(queues_raw, dict):
            raise TraceError(source, number, f"field 'queues': expected an object, got {queues_raw!r}")
        stats = {
            name: _queue_stats(name, body, source=source, line=number) for name, body in queues_raw.items()
        }
        pools = _pool_counts(raw.get("pools"), source=source, line=number)
        _check_order(rows, t, source=source, line=number)
        rows.append(TraceRow(t, stats, pools, number))
    if not rows:
        raise TraceError(source, None, "the trace is empty (no JSON lines)")
    return Trace(name=source, kind="recording", rows=_rebase(rows))
