"""The simulator: traces in, the live loop's own decisions out, summaries, closed loop, charts, CLI."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner
from loguru import logger
from matplotlib.image import imread

from autoscaler.backends.memory import MemoryBackend
from autoscaler.cli import main
from autoscaler.loop import Controller
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.load import load_policy, parse_policy
from autoscaler.policy.model import Policy
from autoscaler.simulate.charts import build_figure, save_chart
from autoscaler.simulate.engine import Replay, replay
from autoscaler.simulate.scenarios import DURATION, SCENARIOS, scenario_trace
from autoscaler.simulate.summary import compare_table, summarize
from autoscaler.simulate.traces import Trace, TraceError, parse_csv, parse_jsonl, read_trace
from autoscaler.simulate.workload import PoolCapacity, estimate_throughput
from autoscaler.state_store import MemoryStateStore
from autoscaler.types import Direction, QueueStats
from tests.test_loop import Clock

ROOT = Path(__file__).resolve().parent.parent
TRACES = Path(__file__).resolve().parent / "fixtures" / "traces"
DEFAULT_POLICY = ROOT / "policies" / "default.yaml"


def one_pool_policy(*, max_replicas: int = 10, top: int = 10, mid: int = 5, enabled: bool = True) -> Policy:
    return parse_policy(
        f"""
interval: 15s
pools:
  fast:
    target: {{compose: {{service: worker-fast}}}}
    queues: [fast]
    min: 2
    max: {max_replicas}
    tiers:
      - {{above: 500, replicas: {top}}}
      - {{above: 100, replicas: {mid}}}
      - {{below: 10, replicas: 2}}
    cooldown: {{up: 30s, down: 5m}}
    stabilization: 5m
    enabled: {str(enabled).lower()}
"""
    )


def smaller_default() -> str:
    """The default policy with every pool capped at 6 replicas."""
    return DEFAULT_POLICY.read_text().replace("replicas: 10", "replicas: 6").replace("max: 10", "max: 6")


def actions(result: Replay, pool: str) -> list[tuple[float, int | None, int | None]]:
    return [(r.t, r.current, r.desired) for r in result.pool_ticks(pool) if r.action is not Direction.HOLD]


def reasons(result: Replay, pool: str) -> dict[float, str]:
    return {r.t: r.reason for r in result.pool_ticks(pool)}


# --- the seed's tiers on a burst -----------------------------------------------------------------------


def test_seed_tiers_on_burst_follow_cooldowns_and_stabilization() -> None:
    """The seed's tiers on the burst trace go up at the first tick above each tier (a higher reading within the
    up-cooldown acts at once) and come back down to 2 only after the 5m stabilization window and then the 5m
    down-cooldown."""
    result = replay(load_policy(DEFAULT_POLICY), read_trace(TRACES / "burst.csv"))
    assert actions(result, "fast") == [(60.0, 2, 5), (75.0, 5, 10), (480.0, 10, 5), (780.0, 5, 2)]
    why = reasons(result, "fast")
    assert all("hold band 10..100: hold" in why[t] for t in (0.0, 15.0, 30.0, 45.0))  # depth 50 at 2: hold
    assert "up-cooldown" not in why[75.0]  # first tick above 500, 15s after the scale-up at 60: not held
    # Inside the band again (t=180..285) and then empty: held at 10 until no 10 is left in the 5m window.
    assert all("stabilization" in why[t] for t in range(180, 480, 15))
    assert all("down-cooldown" in why[t] for t in range(600, 780, 15))  # 5m after the step down at 480


def test_seed_tiers_jump_straight_to_the_top_tier() -> None:
    """From 2, a depth over 500 goes straight to 10 at that tick, back to 2 after the stabilization window."""
    trace = parse_csv("t,fast\n0,0\n120,800\n135,0\n900,0\n", source="jump.csv")
    result = replay(load_policy(DEFAULT_POLICY), trace)
    # The 10 recommended at 120 stays in the window until a newer recommendation is 5m old (t=435).
    assert actions(result, "fast") == [(120.0, 2, 10), (435.0, 10, 2)]


# --- the same decisions as the live loop ---------------------------------------------------------------

EQUIVALENCE_POLICY = """
interval: 15s
pools:
  fast:
    target: {compose: {service: worker-fast}}
    queues: [fast]
    min: 2
    max: 10
    tiers:
      - {above: 500, replicas: 10}
      - {above: 100, replicas: 5}
      - {below: 10, replicas: 2}
    cooldown: {up: 30s, down: 2m}
    stabilization: 3m
    sustain: 30s
    max_step: {up: 4, down: 2}
  bulk:
    target: {swarm: {service: stack_worker-bulk}}
    queues: [bulk, bulk_low]
    min: 1
    max: 12
    per_replica: {value: 40}
    cooldown: {up: 15s, down: 1m}
    stabilization: 2m
"""


class ScriptedSource:
    """A metric source serving whatever the test set for the current tick."""

    def __init__(self) -> None:
        self.queues: dict[str, QueueStats] = {}

    def observe(self, queues: Sequence[str]) -> dict[str, QueueStats]:
        return {q: self.queues[q] for q in queues if q in self.queues}

    def close(self) -> None:
        return None


class OnePolicy:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def poll(self, *, force: bool = False) -> tuple[Policy, str | None]:
        return self.policy, None


def scripted_depths(ticks: int) -> list[dict[str, int]]:
    """Deterministic bursty depths for three queues."""
    rng = random.Random(7)
    rows, level = [], {"fast": 0, "bulk": 0, "bulk_low": 0}
    for k in range(ticks):
        burst = 700 if k % 37 in range(5, 9) else 0
        for q, depth in level.items():
            level[q] = max(0, int(depth * 0.8 + rng.randint(0, 120) + burst * (q != "bulk_low")))
        rows.append(dict(level))
    return rows


def test_simulator_decides_exactly_as_the_live_loop() -> None:
    """A live Controller stepped tick by tick and the simulator, fed the same observations on the same
    clock, reach the same current, desired and reason for every tick and pool."""
    policy = parse_policy(EQUIVALENCE_POLICY)
    rows = scripted_depths(160)

    source, clock = ScriptedSource(), Clock(0.0)
    live = Controller(
        policies=OnePolicy(policy),
        source=source,
        backend=MemoryBackend(replicas={"worker-fast": 2, "stack_worker-bulk": 1}),
        store=MemoryStateStore(),
        metrics=Metrics(),
        clock=clock,
    )
    expected = []
    for k, row in enumerate(rows):
        clock.now = k * 15.0
        source.queues = {q: QueueStats(q, n) for q, n in row.items()}
        for report in live.tick().pools:
            d = report.decision
            expected.append((clock.now, d.pool, d.current, d.desired, d.reason))

    csv_text = "t,fast,bulk,bulk_low\n" + "".join(
        f"{k * 15},{r['fast']},{r['bulk']},{r['bulk_low']}\n" for k, r in enumerate(rows)
    )
    simulated = replay(policy, parse_csv(csv_text, source="scripted.csv"))
    got = [(r.t, r.pool, r.current, r.desired, r.reason) for r in simulated.ticks]
    assert got == expected
    assert sum(r.action is not Direction.HOLD for r in simulated.ticks) >= 10  # the rules were exercised


def test_replay_keeps_the_loops_logging_quiet() -> None:
    """A replay writes no per-tick log lines, and the loop logs again afterwards."""
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(m.record["name"] or ""), level="DEBUG")
    try:
        replay(load_policy(DEFAULT_POLICY), read_trace(TRACES / "burst.csv"))
        assert not [name for name in seen if name.startswith("autoscaler.")]
        logger.bind().info("after")
        assert seen[-1] == __name__
    finally:
        logger.remove(sink)


# --- traces --------------------------------------------------------------------------------------------


def test_csv_and_recording_of_the_same_burst_parse_and_replay_alike() -> None:
    """The CSV and the recorder's JSON lines (epoch times, a few ms of drift per tick) read into rows from
    t=0 and lead to the same actions."""
    csv_trace, jsonl_trace = read_trace(TRACES / "burst.csv"), read_trace(TRACES / "burst.jsonl")
    assert (csv_trace.kind, jsonl_trace.kind) == ("csv", "recording")
    assert [r.t for r in csv_trace.rows] == [0, 60, 75, 180, 300, 1200]
    assert csv_trace.rows[2].queues["fast"] == QueueStats("fast", 800)
    assert jsonl_trace.rows[0].t == 0
    assert jsonl_trace.rows[1].t == pytest.approx(15.004)
    assert jsonl_trace.rows[0].pools == {"fast": 2}
    assert jsonl_trace.rows[0].queues["fast"].latency_s == 1.5
    policy = load_policy(DEFAULT_POLICY)
    assert actions(replay(policy, csv_trace), "fast") == actions(replay(policy, jsonl_trace), "fast")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("t,fast\n0,1\n15,2,3\n", "bad.csv:3: expected 2 values (t, fast), got 3"),
        ("t,fast\n0,1\n15,-2\n", "bad.csv:3: column 'fast': negative: '-2'"),
        ("t,fast\n0,1\n15,2.5\n", "bad.csv:3: column 'fast': not a whole number: '2.5'"),
        ("t,fast\n0,1\nsoon,2\n", "bad.csv:3: column 't': not a number: 'soon'"),
        ("t,fast\n30,1\n15,2\n", "bad.csv:3: t goes back in time (15 after 30 on line 2)"),
        ("queue,fast\n0,1\n", "bad.csv:1: the header must start with `t`"),
        ("t,fast,fast\n0,1,2\n", "bad.csv:1: queue 'fast' appears twice in the header"),
        ("t,fast\n", "bad.csv: the trace has a header but no data rows"),
        ("\n\n", "bad.csv: the trace is empty"),
    ],
)
def test_malformed_csv_names_file_line_and_problem(text: str, message: str) -> None:
    """Each malformed CSV fails with `file:line: what is wrong`."""
    with pytest.raises(TraceError) as caught:
        parse_csv(text, source="bad.csv")
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"t": 1, "queues": {}}\n{"t": 2, "queues": \n', "rec.jsonl:2: not valid JSON"),
        ('{"queues": {}}\n', "rec.jsonl:1: field 't' is missing"),
        (
            '{"t": 1, "queues": {"fast": {"waiting": "many"}}}\n',
            "rec.jsonl:1: queue 'fast' field 'waiting': not a number",
        ),
        ('{"t": 1, "queues": {"fast": {}}}\n', "rec.jsonl:1: queue 'fast': field 'waiting' is missing"),
        ('{"t": 1, "queues": []}\n', "rec.jsonl:1: field 'queues': expected an object"),
        ('[1, 2]\n', "rec.jsonl:1: expected a JSON object, got list"),
        ("\n", "rec.jsonl: the trace is empty (no JSON lines)"),
    ],
)
def test_malformed_recording_names_file_line_and_problem(text: str, message: str) -> None:
    """Each malformed recording line fails with `file:line: what is wrong`."""
    with pytest.raises(TraceError) as caught:
        parse_jsonl(text, source="rec.jsonl")
    assert str(caught.value).startswith(message)


# --- the command line ----------------------------------------------------------------------------------


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["simulate", *args])
    return result.exit_code, result.stdout, result.stderr


def test_cli_malformed_trace_exits_2_with_the_line() -> None:
    """A malformed trace file makes `simulate` exit 2 with the file, line, column and bad value."""
    path = TRACES / "bad_number.csv"
    code, out, err = run_cli("--policy", str(DEFAULT_POLICY), "--trace", str(path))
    assert code == 2
    assert err.strip() == f"{path}:17: column 'fast': not a number: 'abc'"
    assert out == ""


def test_cli_empty_trace_exits_2(tmp_path: Path) -> None:
    """An empty trace file is refused with a message saying so."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run_cli("--policy", str(DEFAULT_POLICY), "--trace", str(empty))
    assert code == 2
    assert "the trace is empty" in err


def test_cli_json_prints_one_object_per_tick_and_pool_and_nothing_else() -> None:
    """`--json` prints exactly the documented keys, one line per tick and pool, in tick order."""
    code, out, _ = run_cli("--policy", str(DEFAULT_POLICY), "--trace", str(TRACES / "burst.csv"), "--json")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 81 * 3  # ticks 0..1200 every 15s, three pools
    assert all(set(obj) == {"t", "pool", "depth", "current", "desired", "action", "reason"} for obj in lines)
    assert {obj["action"] for obj in lines} == {"up", "down", "hold"}
    first_up = next(obj for obj in lines if obj["action"] == "up")
    assert first_up == {
        "t": 60.0, "pool": "fast", "depth": 150, "current": 2, "desired": 5, "action": "up",
        "reason": "150 > 100: tier of 5",
    }


def test_cli_text_prints_timeline_and_summary() -> None:
    """The text report lists each action with time, pool, counts and reason, then a summary row per pool."""
    code, out, _ = run_cli("--policy", str(DEFAULT_POLICY), "--trace", str(TRACES / "burst.csv"))
    assert code == 0
    assert "0:01:15  fast  5 -> 10   800 > 500: tier of 10" in out
    assert "timeline (4 actions):" in out
    summary = out.split("summary:")[1]
    # 4 ticks at 2, 1 at 5, 27 at 10, 20 at 5, 29 at 2: 441 replica-ticks of 15s = 1.84 replica-hours.
    assert summary.splitlines()[2].split()[:4] == ["fast", "2", "2", "1.84"]


def test_cli_compare_prints_policies_side_by_side(tmp_path: Path) -> None:
    """`--compare` prints one column per policy with cost, peak backlog, drain and actions per pool."""
    small = tmp_path / "small.yaml"
    small.write_text(smaller_default())
    code, out, _ = run_cli(
        "--compare", str(DEFAULT_POLICY), str(small), "--scenario", "burst", "--closed-loop"
    )
    assert code == 0
    table = out.split("comparison:")[1].splitlines()
    assert table[1].split() == ["pool", "default", "small"]
    rows = {tuple(line.split()[:3]) for line in table}
    assert ("fast", "cost", "(replica-h)") in rows
    assert any("time to drain" in line for line in table)
    assert any(line.split()[:2] == ["all", "cost"] for line in table)


def test_cli_progress_goes_to_stderr_by_tenths() -> None:
    """`--progress` reports every tenth of the replay on stderr and leaves stdout alone."""
    code, out, err = run_cli("--scenario", "sine", "--policy", str(DEFAULT_POLICY), "--json", "--progress")
    assert code == 0
    assert [line.split(": ")[1].split("%")[0] for line in err.splitlines() if "%" in line] == [
        str(p) for p in range(10, 101, 10)
    ]
    assert all(line.startswith("{") for line in out.splitlines())


def test_cli_rejects_an_unknown_pool() -> None:
    """`--initial` with a pool the policy does not have is a usage error naming the pools."""
    code, _, err = run_cli("--policy", str(DEFAULT_POLICY), "--scenario", "burst", "--initial", "nope=3")
    assert code == 2
    assert "no pool 'nope' (pools: fast, cpu, io)" in err


# --- scenarios -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenarios_are_deterministic_hours_at_the_interval(name: str) -> None:
    """Each scenario is an hour sampled at the interval, the same on every build, later for later queues."""
    trace = scenario_trace(name, queues=["a", "b"], step=15.0)
    assert len(trace.rows) == 240
    assert trace.end == DURATION
    assert trace.rows == scenario_trace(name, queues=["a", "b"], step=15.0).rows
    assert trace.arrival_rate is not None
    assert trace.arrival_rate("b", 1000.0) == trace.arrival_rate("a", 700.0)  # b runs 5 minutes behind a
    assert max(r.queues["a"].waiting for r in trace.rows) > 500  # each shape reaches the seed's top tier


# --- the closed loop -----------------------------------------------------------------------------------


def test_closed_loop_bigger_max_drains_a_burst_faster_and_costs_more() -> None:
    """With the same arrivals and per-replica throughput, a pool allowed 10 replicas clears the burst's
    backlog sooner than one allowed 4, and pays for it in replica-hours."""
    trace = scenario_trace("burst", queues=["fast"], step=15.0)
    capacity = {"fast": PoolCapacity(throughput=1.0)}
    big = summarize(replay(one_pool_policy(max_replicas=10, top=10, mid=5), trace, capacity=capacity))[0]
    small = summarize(replay(one_pool_policy(max_replicas=4, top=4, mid=4), trace, capacity=capacity))[0]
    assert big.drain_s is not None
    assert small.drain_s is not None
    assert big.drain_s < small.drain_s
    assert big.peak_backlog < small.peak_backlog
    assert big.replica_seconds > small.replica_seconds


def test_closed_loop_boot_delay_lets_the_backlog_grow_higher() -> None:
    """Replicas that take a minute to boot serve nothing meanwhile, so the burst's backlog peaks higher."""
    trace = scenario_trace("burst", queues=["fast"], step=15.0)
    policy = one_pool_policy(max_replicas=10, top=10, mid=5)
    instant = summarize(replay(policy, trace, capacity={"fast": PoolCapacity(1.0, 0.0)}))[0]
    slow = summarize(replay(policy, trace, capacity={"fast": PoolCapacity(1.0, 60.0)}))[0]
    assert slow.peak_backlog > instant.peak_backlog


def synthetic_recording(*, rate: float, replicas: Sequence[int], seconds: float = 15.0) -> str:
    """A recorder trace of one queue served at `rate` tasks/s per replica under bursty arrivals."""
    bursts = {range(10, 15): 40.0, range(60, 64): 55.0, range(130, 136): 30.0, range(190, 193): 70.0}
    depth, lines = 0.0, []
    for i, n in enumerate(replicas):
        lines.append(
            json.dumps(
                {
                    "t": 1_700_000_000 + i * seconds,
                    "queues": {"fast": {"waiting": round(depth), "unacked": 0, "latency_s": 0.0}},
                    "pools": {"fast": {"current": n, "desired": n}},
                }
            )
        )
        arriving = 0.5 + sum(r for span, r in bursts.items() if i in span)
        depth = max(0.0, depth + (arriving - n * rate) * seconds)
    return "\n".join(lines) + "\n"


def test_throughput_estimate_recovers_the_true_rate_within_ten_percent() -> None:
    """From a recording with bursts, background arrivals and changing replica counts, the estimator finds
    the per-replica rate the recording was made with to within 10%."""
    replicas = [[2, 4, 3, 6, 2, 5, 8, 3, 4, 2, 6, 3][i // 20] for i in range(240)]
    trace = parse_jsonl(synthetic_recording(rate=3.0, replicas=replicas), source="synthetic.jsonl")
    estimate = estimate_throughput(trace, load_policy(DEFAULT_POLICY).pool("fast"))
    assert estimate is not None
    assert estimate.periods >= 20
    assert estimate.rate == pytest.approx(3.0, rel=0.1)


def test_closed_loop_with_the_recorded_replicas_reproduces_the_recording() -> None:
    """Arrivals derived from a recording, served by the same replicas at the same rate, give back the
    recorded depths (so any difference in a replay comes from the policy)."""
    trace = parse_jsonl(synthetic_recording(rate=3.0, replicas=[4] * 120), source="steady.jsonl")
    paused = one_pool_policy(enabled=False)  # holds whatever runs: the recorded 4
    result = replay(paused, trace, initial={"fast": 4}, capacity={"fast": PoolCapacity(3.0)})
    replayed = [r.depth for r in result.pool_ticks("fast")]
    recorded = [row.queues["fast"].waiting for row in trace.rows]
    assert max(recorded) > 500
    assert all(abs(a - b) <= 1 for a, b in zip(replayed, recorded, strict=True))


# --- charts --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def burst_replays() -> list[Replay]:
    policy = load_policy(DEFAULT_POLICY)
    trace: Trace = scenario_trace("burst", queues=policy.queues, step=policy.interval)
    capacity = {p.name: PoolCapacity(2.0, 30.0) for p in policy.pools}
    small = parse_policy(smaller_default())
    return [
        replay(policy, trace, label="default", capacity=capacity),
        replay(small, trace, label="small", capacity=capacity),
    ]


def test_png_chart_has_a_panel_per_pool_and_real_content(burst_replays: list[Replay], tmp_path: Path) -> None:
    """The PNG has one panel (depth axis plus its replica twin) per pool, weighs more than a few KB, and
    is not a blank single-colour image."""
    figure = build_figure(burst_replays[:1])
    assert len(figure.axes) == 2 * 3
    assert len({ax.get_subplotspec().rowspan.start for ax in figure.axes}) == 3  # type: ignore[union-attr]
    assert [ax.get_title(loc="left") for ax in figure.axes[:3]] == ["fast", "cpu", "io"]
    out = tmp_path / "burst.png"
    save_chart(burst_replays[:1], out)
    assert out.stat().st_size > 20_000
    pixels = imread(out)
    assert pixels.ndim == 3
    assert pixels[..., :3].var() > 0.01


def test_compare_chart_overlays_every_policy(burst_replays: list[Replay]) -> None:
    """A comparison chart still has one panel per pool, with a replica line for each policy."""
    figure = build_figure(burst_replays)
    assert len(figure.axes) == 2 * 3
    labels = [line.get_label() for ax in figure.axes for line in ax.get_lines()]
    assert labels.count("replicas (default)") == labels.count("replicas (small)") == 3


def test_html_report_is_one_self_contained_file(burst_replays: list[Replay], tmp_path: Path) -> None:
    """The HTML report holds the chart as inline SVG and the tables, and references nothing external."""
    out = tmp_path / "report.html"
    save_chart(burst_replays, out)
    assert list(tmp_path.iterdir()) == [out]
    page = out.read_text()
    assert page.count("<svg") == 1
    assert "<table>" in page
    assert "Comparison" in page
    for external in ('src="http', "src='http", 'href="http', "<script", "<link", "url(http", "@import"):
        assert external not in page


def test_compare_table_lines_up_the_figures_per_policy(burst_replays: list[Replay]) -> None:
    """The comparison puts each policy's cost, peak, drain and actions in its own column, pool by pool."""
    header, rows = compare_table(burst_replays)
    assert header == ["pool", "", "default", "small"]
    cost = next(r for r in rows if r[:2] == ["fast", "cost (replica-h)"])
    default, small = (summarize(r)[0] for r in burst_replays)
    assert cost[2:] == [f"{default.replica_hours:.2f}", f"{small.replica_hours:.2f}"]
    assert float(cost[2]) > float(cost[3])  # ten replicas cost more than six
