"""`autoscaler simulate`: replay a recording, a CSV or a built-in scenario through one policy or several.

Reads its inputs, hands them to the engine, and prints: a timeline and per-pool summary (text), one JSON
object per tick and pool (`--json`), or a side-by-side table (`--compare`); `--chart` adds a PNG or HTML
file. A malformed trace exits with 2 after a `file:line: what` message; an invalid policy exits with 1.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import click

from autoscaler.policy.load import PolicyError, load_policy
from autoscaler.policy.model import Policy, parse_duration
from autoscaler.simulate.engine import Replay, replay
from autoscaler.simulate.scenarios import SCENARIOS, scenario_trace
from autoscaler.simulate.summary import (
    compare_table,
    format_table,
    header_lines,
    summary_table,
    timeline_table,
)
from autoscaler.simulate.traces import Trace, TraceError, read_trace
from autoscaler.simulate.workload import resolve_capacity

__all__ = ["simulate"]

_DEFAULT_POLICY = "policies/default.yaml"
_CHART_SUFFIXES = (".png", ".html", ".htm")
_EXIT_BAD_INPUT = 2  # a bad trace or a missing extra, as click does for bad flags
_EXIT_BAD_POLICY = 1  # as `run`, `status` and `validate` do

T = TypeVar("T")


def _per_pool(
    values: Sequence[str], *, option: str, pools: Sequence[str], parse: Callable[[str], T]
) -> dict[str, T]:
    """`pool=value` for one pool, or a bare `value` for every pool; later flags win."""
    found: dict[str, T] = {}
    for raw in values:
        name, sep, text = raw.partition("=")
        if not sep:
            name, text = "", raw
        try:
            value = parse(text.strip())
        except ValueError as exc:
            raise click.BadParameter(f"{raw!r}: {exc}", param_hint=option) from None
        if not name:
            found.update(dict.fromkeys(pools, value))
        elif (pool := name.strip()) not in pools:
            raise click.BadParameter(f"no pool {pool!r} (pools: {', '.join(pools)})", param_hint=option)
        else:
            found[pool] = value
    return found


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be more than 0 tasks/s")
    return value


class _Progress:
    """Progress on stderr at every tenth of a replay."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._shown = 0

    def __call__(self, done: int, total: int) -> None:
        tenth = done * 10 // total
        if tenth > self._shown:
            self._shown = tenth
            click.echo(f"simulate {self._label}: {tenth * 10}% ({done}/{total} ticks)", err=True)


def _interval(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--interval") from None
    if seconds <= 0:
        raise click.BadParameter("must be more than 0", param_hint="--interval")
    return seconds


def _read(path: Path) -> Trace:
    try:
        return read_trace(path)
    except TraceError as exc:
        click.echo(str(exc), err=True)
        sys.exit(_EXIT_BAD_INPUT)


def _labels(paths: Sequence[Path]) -> list[str]:
    if len(paths) == 1:
        return [str(paths[0])]
    # Compared policies head table columns: their file names, unless two share one.
    stems = [p.stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


def _load_policies(paths: Sequence[Path]) -> list[Policy]:
    policies = []
    for path in paths:
        try:
            policies.append(load_policy(path))
        except PolicyError as exc:
            for problem in exc.problems:
                click.echo(str(problem), err=True)
            sys.exit(_EXIT_BAD_POLICY)
    return policies


def _coverage_note(trace: Trace, policy: Policy, *, closed_loop: bool) -> str | None:
    missing = [q for q in policy.queues if q not in trace.queues]
    if not missing:
        return None
    pools = [p.name for p in policy.pools if any(q in missing for q in p.queues)]
    effect = "get no arrivals" if closed_loop else "hold (no reading for the queue)"
    return f"note: {trace.name} has no queue(s) {', '.join(missing)}: pool(s) {', '.join(pools)} {effect}"


def _policy_paths(policy_path: Path | None, compare: bool, extra: tuple[Path, ...]) -> list[Path]:
    if compare:
        paths = ([policy_path] if policy_path else []) + list(extra)
        if len(paths) < 2:
            raise click.UsageError("--compare needs at least two policy files, e.g. --compare a.yaml b.yaml")
        return paths
    if extra:
        given = " ".join(map(str, extra))
        raise click.UsageError(f"unexpected argument(s) {given}: to compare policies use --compare")
    return [policy_path or Path(os.environ.get("AUTOSCALER_POLICY") or _DEFAULT_POLICY)]


def _json_lines(replays: Sequence[Replay]) -> None:
    for r in replays:
        for tick in r.ticks:
            line = {
                "t": round(tick.t, 3),
                "pool": tick.pool,
                "depth": tick.depth,
                "current": tick.current,
                "desired": tick.desired,
                "action": str(tick.action),
                "reason": tick.reason,
            }
            if len(replays) > 1:
                line = {"policy": r.label, **line}
            click.echo(json.dumps(line))


def _text_report(replays: Sequence[Replay]) -> None:
    for r in replays:
        click.echo("\n".join(header_lines(r)))
        header, rows = timeline_table(r)
        click.echo(f"\ntimeline ({len(rows)} actions):")
        if rows:
            click.echo(format_table((header, rows), indent="  "))
        click.echo("\nsummary:")
        click.echo(format_table(summary_table(r), indent="  "))
        click.echo()
    if len(replays) > 1:
        click.echo("comparison:")
        click.echo(format_table(compare_table(replays), indent="  "))


@click.command("simulate")
@click.argument("compared", nargs=-1, type=click.Path(dir_okay=False, path_type=Path), metavar="[POLICY]...")
@click.option(
    "--policy", "policy_path", type=click.Path(dir_okay=False, path_type=Path),
    help=f"policy to replay (default: $AUTOSCALER_POLICY or {_DEFAULT_POLICY})",
)
@click.option("--compare", is_flag=True, help="replay every POLICY given as argument and compare them")
@click.option(
    "--trace", "trace_path", type=click.Path(dir_okay=False, path_type=Path),
    help="recording (`run --dry-run --record`, JSON lines) or CSV `t,<queue>,...` of waiting depths",
)
@click.option("--scenario", type=click.Choice(sorted(SCENARIOS)), help="a built-in hour of traffic instead")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object per tick and pool, nothing else")
@click.option(
    "--chart", type=click.Path(dir_okay=False, path_type=Path), help="also write a chart: OUT.png or OUT.html"
)
@click.option("--initial", multiple=True, metavar="[POOL=]N", help="replicas at the start (default: min)")
@click.option("--closed-loop", is_flag=True, help="simulate the backlog the scaled pools would leave")
@click.option("--throughput", multiple=True, metavar="[POOL=]R", help="closed loop: tasks/s per replica")
@click.option("--boot-delay", multiple=True, metavar="[POOL=]S", help="closed loop: a replica's start-up")
@click.option("--interval", "interval_text", metavar="S", help="time between ticks (default: the policy's)")
@click.option("--progress/--no-progress", default=None, help="progress on stderr (default: on a terminal)")
def simulate(
    *,
    compared: tuple[Path, ...],
    policy_path: Path | None,
    compare: bool,
    trace_path: Path | None,
    scenario: str | None,
    as_json: bool,
    chart: Path | None,
    initial: tuple[str, ...],
    closed_loop: bool,
    throughput: tuple[str, ...],
    boot_delay: tuple[str, ...],
    interval_text: str | None,
    progress: bool | None,
) -> None:
    """Replay observations through a policy with the live loop's own decision code, on simulated time.

    \b
    autoscaler simulate --policy policies/default.yaml --scenario burst
    autoscaler simulate --trace live.jsonl --closed-loop --chart replay.html
    autoscaler simulate --compare policies/default.yaml eager.yaml --scenario spiky --chart cmp.png
    """
    if (trace_path is None) == (scenario is None):
        raise click.UsageError("give exactly one of --trace FILE or --scenario NAME")
    if chart is not None and chart.suffix.lower() not in _CHART_SUFFIXES:
        raise click.BadParameter("the chart must be a .png or .html file", param_hint="--chart")
    if (throughput or boot_delay) and not closed_loop:
        raise click.UsageError("--throughput and --boot-delay only apply with --closed-loop")
    interval = None if interval_text is None else _interval(interval_text)

    paths = _policy_paths(policy_path, compare, compared)
    policies = _load_policies(paths)
    pools = list(dict.fromkeys(p.name for policy in policies for p in policy.pools))
    counts = _per_pool(initial, option="--initial", pools=pools, parse=_count)
    rates = _per_pool(throughput, option="--throughput", pools=pools, parse=_rate)
    boots = _per_pool(boot_delay, option="--boot-delay", pools=pools, parse=parse_duration)

    recorded = None if trace_path is None else _read(trace_path)
    queues = list(dict.fromkeys(q for policy in policies for q in policy.queues))
    show_progress = sys.stderr.isatty() if progress is None else progress
    replays = []
    for label, policy in zip(_labels(paths), policies, strict=True):
        step = interval or policy.interval
        # A scenario is sampled at each policy's own interval: compared policies may tick at different rates.
        trace = recorded or scenario_trace(scenario or "", queues=queues, step=step)
        if recorded is not None and (note := _coverage_note(trace, policy, closed_loop=closed_loop)):
            click.echo(note, err=True)
        capacity = resolve_capacity(policy, trace, throughput=rates, boot_delay=boots) if closed_loop else None
        reporter = _Progress(label) if show_progress else None
        replays.append(
            replay(policy, trace, label=label, interval=step, initial=counts, capacity=capacity, progress=reporter)
        )

    if as_json:
        _json_lines(replays)
    else:
        _text_report(replays)
    if chart is not None:
        _write_chart(replays, chart)


def _write_chart(replays: Sequence[Replay], chart: Path) -> None:
    try:
        from autoscaler.simulate.charts import save_chart  # noqa: PLC0415 - matplotlib is an optional extra
    except ImportError as exc:
        click.echo(f"error: --chart needs matplotlib ({exc}); install autoscaler[charts]", err=True)
        sys.exit(_EXIT_BAD_INPUT)
    save_chart(replays, chart)
    click.echo(f"chart written to {chart}", err=True)
