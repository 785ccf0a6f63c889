"""What a replay amounts to: per-pool figures, the timeline of actions, and tables for text and HTML.

Per pool: actions up and down; time at each replica count and replica-seconds (what the pool costs;
every tick stands for one interval at the count it left running); peak backlog (waiting tasks, as
observed at the ticks); reaction per tier (from the first tick the metric is above a tier's `above` bound,
or for `per_replica` above `current x value`, to the first tick the pool runs that tier's count, or the
count recommended at that breach); and time to drain: how long the backlog around the peak lasted, from
the first tick the metric left the quiet level before the peak to the first tick after it the metric is
back there. The quiet level is the policy's own: under the lowest `below` tier (an empty queue without
one), or for `per_replica` at or under `activation`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from autoscaler.policy.model import Metric, PoolPolicy, format_duration
from autoscaler.simulate.engine import Replay, TickRecord
from autoscaler.types import Direction

__all__ = [
    "PoolSummary",
    "Reaction",
    "Table",
    "compare_table",
    "format_clock",
    "format_seconds",
    "format_table",
    "header_lines",
    "summarize",
    "summary_table",
    "timeline",
    "timeline_table",
]

Table = tuple[list[str], list[list[str]]]

_NO_METRIC = "no metric"


@dataclass(frozen=True, slots=True)
class Reaction:
    """How long the pool took to reach a tier's count after the metric first called for it."""

    label: str
    breached_at: float | None
    reached_at: float | None

    @property
    def seconds(self) -> float | None:
        if self.breached_at is None or self.reached_at is None:
            return None
        return self.reached_at - self.breached_at

    def describe(self) -> str:
        if self.breached_at is None:
            return f"{self.label}: not breached"
        if self.seconds is None:
            return f"{self.label}: not reached"
        return f"{self.label}: {format_seconds(self.seconds)}"


@dataclass(frozen=True, slots=True)
class PoolSummary:
    pool: str
    ups: int
    downs: int
    time_at: Mapping[int, float]
    replica_seconds: float
    peak_backlog: int
    peak_at: float
    drain_s: float | None
    reactions: tuple[Reaction, ...]
    observed: bool = True  # False: the metric was never available (e.g. the trace lacks the pool's queues)

    @property
    def actions(self) -> int:
        return self.ups + self.downs

    @property
    def replica_hours(self) -> float:
        return self.replica_seconds / 3600


def format_seconds(seconds: float | None) -> str:
    """`None` -> `never`; else the policy file's duration notation (`1m30s`)."""
    return "never" if seconds is None else format_duration(round(seconds, 1))


def format_clock(t: float) -> str:
    """Seconds from the start -> `H:MM:SS`."""
    whole = round(t)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _reactions(pool: PoolPolicy, ticks: list[TickRecord]) -> tuple[Reaction, ...]:
    def reached(after: float, count: int) -> float | None:
        return next((r.t for r in ticks if r.t >= after and r.replicas >= count), None)

    if pool.tiers is not None:
        found = []
        for tier in sorted((t for t in pool.tiers if t.above is not None), key=lambda t: t.bound):
            breach = next((r.t for r in ticks if r.metric is not None and r.metric > tier.bound), None)
            label = f">{tier.bound:g} -> {tier.replicas}"
            found.append(Reaction(label, breach, None if breach is None else reached(breach, tier.replicas)))
        return tuple(found)
    assert pool.per_replica is not None  # the model guarantees exactly one strategy
    value = pool.per_replica.value
    for r in ticks:
        if r.metric is None or r.current is None:
            continue
        limit = value if pool.metric is Metric.LATENCY else r.current * value
        if r.metric > limit:
            target = r.recommendation if r.recommendation is not None else r.current
            return (Reaction(f"per_replica -> {target}", r.t, reached(r.t, target)),)
    return (Reaction("per_replica", None, None),)


def _quiet(pool: PoolPolicy, metric: float | None) -> bool:
    if metric is None:
        return False
    if pool.tiers is not None:
        below = [t.bound for t in pool.tiers if t.below is not None]
        return metric < min(below) if below else metric <= 0
    assert pool.per_replica is not None
    return metric <= pool.per_replica.activation


def summarize(replay: Replay) -> list[PoolSummary]:
    """One summary per pool of the replayed policy, in policy order."""
    summaries = []
    for pool in replay.policy.pools:
        ticks = replay.pool_ticks(pool.name)
        time_at: dict[int, float] = {}
        for r in ticks:
            time_at[r.replicas] = time_at.get(r.replicas, 0.0) + replay.interval
        peak = max(ticks, key=lambda r: r.depth)
        drained = next((r.t for r in ticks if r.t >= peak.t and _quiet(pool, r.metric)), None)
        last_quiet = next((r.t for r in reversed(ticks) if r.t < peak.t and _quiet(pool, r.metric)), None)
        began = ticks[0].t if last_quiet is None else last_quiet + replay.interval
        summaries.append(
            PoolSummary(
                pool=pool.name,
                ups=sum(r.action is Direction.UP for r in ticks),
                downs=sum(r.action is Direction.DOWN for r in ticks),
                time_at=dict(sorted(time_at.items())),
                replica_seconds=sum(n * s for n, s in time_at.items()),
                peak_backlog=peak.depth,
                peak_at=peak.t,
                drain_s=None if drained is None else max(0.0, drained - began),
                reactions=_reactions(pool, ticks),
                observed=any(r.metric is not None for r in ticks),
            )
        )
    return summaries


def timeline(replay: Replay) -> list[TickRecord]:
    """Every tick at which a pool's count changed, in time order."""
    return [r for r in replay.ticks if r.action is not Direction.HOLD]


def timeline_table(replay: Replay) -> Table:
    rows = [
        [format_clock(r.t), r.pool, f"{r.current} -> {r.desired}", r.reason] for r in timeline(replay)
    ]
    return ["t", "pool", "replicas", "reason"], rows


def _time_at(summary: PoolSummary, duration: float) -> str:
    return ", ".join(
        f"{n}: {format_seconds(s)} ({s / duration:.0%})" for n, s in summary.time_at.items()
    )


def summary_table(replay: Replay) -> Table:
    """One row per pool: the figures of `summarize`."""
    header = ["pool", "up", "down", "replica-h", "peak backlog", "drain", "reaction", "time at replicas"]
    rows = [
        [
            s.pool,
            str(s.ups),
            str(s.downs),
            f"{s.replica_hours:.2f}",
            f"{s.peak_backlog} at {format_clock(s.peak_at)}",
            format_seconds(s.drain_s) if s.observed else _NO_METRIC,
            "; ".join(r.describe() for r in s.reactions) if s.observed else _NO_METRIC,
            _time_at(s, replay.duration),
        ]
        for s in summarize(replay)
    ]
    return header, rows


def _first_reaction(summary: PoolSummary) -> str:
    if not summary.observed:
        return _NO_METRIC
    return summary.reactions[0].describe() if summary.reactions else "-"


def compare_table(replays: Sequence[Replay]) -> Table:
    """Policies side by side: per pool (and for all pools) cost, peak backlog, drain, actions, reaction."""
    by_label = [{s.pool: s for s in summarize(r)} for r in replays]
    pools = list(dict.fromkeys(p for r in replays for p in r.pools))
    header = ["pool", "", *(r.label for r in replays)]
    rows: list[list[str]] = []
    figures: list[tuple[str, str]] = [
        ("cost (replica-h)", "cost"),
        ("peak backlog", "peak"),
        ("time to drain", "drain"),
        ("actions (up/down)", "actions"),
        ("first reaction", "reaction"),
    ]

    def cell(summary: PoolSummary | None, key: str) -> str:
        if summary is None:
            return "-"
        return {
            "cost": f"{summary.replica_hours:.2f}",
            "peak": str(summary.peak_backlog),
            "drain": format_seconds(summary.drain_s) if summary.observed else _NO_METRIC,
            "actions": f"{summary.actions} ({summary.ups}/{summary.downs})",
            "reaction": _first_reaction(summary),
        }[key]

    for pool in pools:
        for i, (title, key) in enumerate(figures):
            rows.append([pool if i == 0 else "", title, *(cell(s.get(pool), key) for s in by_label)])
    totals = [sum(s.replica_hours for s in summaries.values()) for summaries in by_label]
    actions = [sum(s.actions for s in summaries.values()) for summaries in by_label]
    rows.append(["all", "cost (replica-h)", *(f"{c:.2f}" for c in totals)])
    rows.append(["", "actions", *(str(a) for a in actions)])
    return header, rows


def format_table(table: Table, *, indent: str = "") -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    header, rows = table
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = []
    for row in (header, *rows):
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)] + row[-1:]
        lines.append((indent + "  ".join(cells)).rstrip())
    return "\n".join(lines)


def header_lines(replay: Replay) -> list[str]:
    """What was replayed and how: trace, mode, ticks, and in the closed loop each pool's capacity."""
    ticks = math.floor(replay.duration / replay.interval + 0.5)
    mode = "closed loop" if replay.closed_loop else "open loop (depths as recorded)"
    every, total = format_seconds(replay.interval), format_seconds(replay.duration)
    lines = [f"{replay.label} on {replay.trace.name}: {mode}, {ticks} ticks every {every} ({total})"]
    for pool, capacity in replay.capacity.items():
        boot = format_seconds(capacity.boot_delay)
        rate = f"{capacity.throughput:.3g} tasks/s per replica"
        lines.append(f"  {pool}: {rate}, boot {boot} ({capacity.origin})")
    return lines
