"""Charts of replays: one panel per pool with depth (left axis), replicas (right axis, steps) and the tier
thresholds, as a PNG (matplotlib's Agg renderer, no display needed) or one self-contained HTML file
(the chart as inline SVG plus the summary and timeline tables; no scripts, stylesheets or images fetched).

Several replays (a comparison) share the panels: each policy's replicas get their own colour; depths are
drawn once when they are the trace's own (open loop) and per policy in the closed loop, where they differ.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib as mpl
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from autoscaler.policy.model import Metric
from autoscaler.simulate.engine import Replay
from autoscaler.simulate.summary import (
    Table,
    compare_table,
    header_lines,
    summary_table,
    timeline_table,
)

__all__ = ["build_figure", "html_report", "save_chart"]

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
_DEPTH = "#7f7f7f"
_PANEL_HEIGHT = 2.9
_LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.5}


def _pools(replays: Sequence[Replay]) -> list[str]:
    return list(dict.fromkeys(p for r in replays for p in r.pools))


def _thresholds(ax: Axes, replays: Sequence[Replay], pool: str) -> None:
    drawn: set[tuple[str, float]] = set()
    for replay in replays:
        if pool not in replay.pools:
            continue
        policy = replay.policy.pool(pool)
        # Latency tiers are in seconds, not tasks: they have no place on the depth axis.
        if policy.tiers is None or policy.metric is Metric.LATENCY:
            continue
        for tier in policy.tiers:
            kind = "above" if tier.above is not None else "below"
            if (kind, tier.bound) in drawn:
                continue
            drawn.add((kind, tier.bound))
            colour = "#c0392b" if kind == "above" else "#27ae60"
            ax.axhline(tier.bound, color=colour, linestyle="--" if kind == "above" else ":", linewidth=0.9)
            ax.annotate(
                f"{'>' if kind == 'above' else '<'} {tier.bound:g} -> {tier.replicas}",
                xy=(0.005, tier.bound), xycoords=("axes fraction", "data"), fontsize=7, color=colour,
                va="bottom", zorder=5, bbox=_LABEL_BOX,
            )


def _panel(ax: Axes, replays: Sequence[Replay], pool: str) -> None:
    twin = ax.twinx()
    ax.set_zorder(twin.get_zorder() + 1)  # threshold labels above the replica steps; the twin then
    ax.patch.set_visible(False)  # shows through the depth axis's transparent background
    highest = 1
    open_depth_drawn = False
    for i, replay in enumerate(replays):
        if pool not in replay.pools:
            continue
        colour = _COLOURS[i % len(_COLOURS)]
        ticks = replay.pool_ticks(pool)
        minutes = [r.t / 60 for r in ticks]
        depth = [r.depth for r in ticks]
        if replay.closed_loop and len(replays) > 1:
            ax.plot(minutes, depth, color=colour, alpha=0.45, linewidth=1.2, label=f"depth ({replay.label})")
        elif not open_depth_drawn:
            ax.fill_between(minutes, depth, step="post", color=_DEPTH, alpha=0.35, linewidth=0)
            ax.step(minutes, depth, where="post", color=_DEPTH, linewidth=1.0, label="depth")
            open_depth_drawn = True
        label = f"replicas ({replay.label})" if len(replays) > 1 else "replicas"
        replicas = [r.replicas for r in ticks]
        twin.step(minutes, replicas, where="post", color=colour, linewidth=1.8, label=label)
        highest = max(highest, replay.policy.pool(pool).max, *replicas)
    _thresholds(ax, replays, pool)
    ax.set_title(pool, loc="left", fontsize=10, fontweight="bold")
    ax.set_ylabel("depth (waiting tasks)")
    ax.set_ylim(bottom=0)
    ax.grid(axis="x", alpha=0.3)
    twin.set_ylabel("replicas")
    twin.set_ylim(0, highest * 1.15 + 0.5)
    twin.yaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = twin.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, loc="upper right", fontsize=7, framealpha=0.8)


def build_figure(replays: Sequence[Replay]) -> Figure:
    """One panel per pool (a depth axis and its twin replica axis), stacked on a shared time axis."""
    if not replays:
        raise ValueError("nothing to chart: no replay")
    pools = _pools(replays)
    figure = Figure(figsize=(11, _PANEL_HEIGHT * len(pools) + 0.7), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(pools), 1, sharex=True, squeeze=False)[:, 0]
    for ax, pool in zip(axes, pools, strict=True):
        _panel(ax, replays, pool)
    axes[-1].set_xlabel("minutes from start")
    first = replays[0]
    mode = "closed loop" if first.closed_loop else "open loop"
    figure.suptitle(f"{' vs '.join(r.label for r in replays)} on {first.trace.name} ({mode})", fontsize=11)
    return figure


def _html_table(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _svg(figure: Figure) -> str:
    buffer = io.StringIO()
    # A fixed salt keeps element ids stable between runs; glyphs as paths need no font on the reader's side.
    with mpl.rc_context({"svg.hashsalt": "autoscaler-simulate", "svg.fonttype": "path"}):
        figure.savefig(buffer, format="svg", metadata=dict.fromkeys(("Creator", "Date", "Format", "Type")))
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML declaration and DOCTYPE: not allowed inside HTML


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
svg { max-width: 100%; height: auto; }
pre { background: #f7f7f7; padding: 0.6em; }
"""


def html_report(replays: Sequence[Replay], figure: Figure) -> str:
    """The whole report as one HTML document with nothing external."""
    title = f"autoscaler simulate: {' vs '.join(r.label for r in replays)} on {replays[0].trace.name}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<pre>" + html.escape("\n".join(line for r in replays for line in header_lines(r))) + "</pre>",
        f"<figure>{_svg(figure)}</figure>",
    ]
    if len(replays) > 1:
        parts += ["<h2>Comparison</h2>", _html_table(compare_table(replays))]
    for replay in replays:
        suffix = f": {html.escape(replay.label)}" if len(replays) > 1 else ""
        parts += [f"<h2>Summary{suffix}</h2>", _html_table(summary_table(replay))]
        parts += [f"<h2>Timeline{suffix}</h2>", _html_table(timeline_table(replay))]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def save_chart(replays: Sequence[Replay], path: str | Path) -> Figure:
    """Write the chart to `path`: `.png` as an image, `.html` as a self-contained report."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in (".png", ".html", ".htm"):
        raise ValueError(f"{target}: the chart must be a .png or .html file")
    figure = build_figure(replays)
    if suffix == ".png":
        figure.savefig(target, format="png", dpi=100, metadata={"Software": None})
    else:
        target.write_text(html_report(replays, figure), encoding="utf-8")
    return figure
