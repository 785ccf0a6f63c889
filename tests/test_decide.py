"""The pure decision core: table-driven cases for each rule, then properties over random inputs."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.policy.decide import decide, prune_history, window_values
from autoscaler.policy.model import PoolPolicy
from autoscaler.types import Direction, Observation, PoolState, QueueStats

SEED_TIERS = [{"above": 500, "replicas": 10}, {"above": 100, "replicas": 5}, {"below": 10, "replicas": 2}]


def pool(**overrides: Any) -> PoolPolicy:
    body: dict[str, Any] = {
        "name": "fast",
        "target": {"compose": {"service": "worker-fast"}},
        "queues": ["fast"],
        "min": 2,
        "max": 10,
        "tiers": SEED_TIERS,
        "cooldown": {"up": "30s", "down": "5m"},
        "stabilization": "5m",
    }
    body.update(overrides)
    return PoolPolicy.model_validate(body)


def obs(waiting: int, current: int | None, *, unacked: int = 0, latency: float | None = 0.0) -> Observation:
    return Observation(queues=(QueueStats("fast", waiting, unacked, latency),), current=current)


# --- table-driven: one rule per case -------------------------------------------------------------------

CASES = [
    pytest.param({}, obs(600, 2), PoolState(), 10, "> 500", id="seed tier >500 -> 10"),
    pytest.param({}, obs(501, 2), PoolState(), 10, "> 500", id="just above 500"),
    pytest.param({}, obs(500, 2), PoolState(), 5, "> 100", id="500 is not above 500"),
    pytest.param({}, obs(150, 2), PoolState(), 5, "> 100", id="seed tier >100 -> 5"),
    pytest.param({}, obs(50, 2), PoolState(), 2, "hold band", id="hold band holds 2"),
    pytest.param({}, obs(50, 4), PoolState(), 4, "hold band", id="hold band holds a manual 4"),
    pytest.param(
        {},
        obs(50, 10),
        PoolState(recommendations=((-400.0, 5),)),
        5,
        "limited to 2..5",
        id="hold band from 10 is limited to the >100 tier",
    ),
    pytest.param(
        {},
        obs(5, 5),
        PoolState(recommendations=((-400.0, 2),)),
        2,
        "< 10",
        id="below 10 -> 2 once stable",
    ),
    pytest.param({}, obs(5, 5), PoolState(), 5, "stabilization", id="fresh controller does not shrink at once"),
    pytest.param(
        {},
        obs(5, 5),
        PoolState(last_scale_up=-100.0, recommendations=((-400.0, 2),)),
        5,
        "down-cooldown",
        id="down-cooldown after a scale-up",
    ),
    pytest.param(
        {},
        obs(600, 5),
        PoolState(last_scale_up=-10.0),
        5,
        "up-cooldown",
        id="up-cooldown blocks scale-up",
    ),
    pytest.param(
        {},
        obs(600, 2),
        PoolState(last_scale_down=-10.0),
        10,
        "> 500",
        id="scale-up during a down-cooldown acts at once",
    ),
    pytest.param(
        {},
        obs(1956, 5),
        PoolState(last_scale_up=-10.0, last_scale_up_to=5),
        10,
        "> 500",
        id="a higher reading within the up-cooldown acts at once (2 -> 5 at 269, then 1956 -> 10)",
    ),
    pytest.param(
        {"max_step": {"up": 3}},
        obs(1956, 5),
        PoolState(last_scale_up=-10.0, last_scale_up_to=5),
        8,
        "step limit 3",
        id="a higher reading within the up-cooldown is bounded by the step limit",
    ),
    pytest.param(
        {},
        obs(600, 5),
        PoolState(last_scale_up=-10.0, last_scale_up_to=10),
        5,
        "the last scale-up reached 10",
        id="within the up-cooldown no higher than the last scale-up: held",
    ),
    pytest.param(
        {},
        obs(600, 3),
        PoolState(last_scale_up=-20.0, last_scale_down=-10.0, last_scale_up_to=5),
        3,
        "up-cooldown after a scale-down",
        id="within the up-cooldown after a scale-down: held (no flapping)",
    ),
    pytest.param({"max_step": {"up": 3}}, obs(600, 2), PoolState(), 5, "step limit 3", id="step limit up"),
    pytest.param(
        {"max_step": {"down": 1}},
        obs(5, 5),
        PoolState(recommendations=((-400.0, 2),)),
        4,
        "step limit 1",
        id="step limit down",
    ),
    pytest.param({"enabled": False}, obs(600, 2), PoolState(), 2, "paused", id="paused pool holds"),
    pytest.param(
        {"scale_in": False},
        obs(5, 5),
        PoolState(recommendations=((-400.0, 2),)),
        5,
        "scale-in paused",
        id="scale-in paused holds on the way down",
    ),
    pytest.param({"scale_in": False}, obs(600, 2), PoolState(), 10, "> 500", id="scale-in paused still grows"),
    pytest.param({}, obs(0, 1), PoolState(), 2, "below min", id="below min goes to min at once"),
    pytest.param({}, obs(600, 12), PoolState(), 10, "above max", id="above max goes to max at once"),
    pytest.param({"sustain": "5m"}, obs(150, 2), PoolState(), 2, "not yet sustained", id="sustain not yet met"),
    pytest.param(
        {"sustain": "5m"},
        obs(150, 2),
        PoolState(recommendations=((-300.0, 5), (-150.0, 5))),
        5,
        "> 100",
        id="sustained for 5m scales",
    ),
    pytest.param(
        {"sustain": "5m"},
        obs(150, 2),
        PoolState(recommendations=((-300.0, 2), (-150.0, 5))),
        2,
        "not yet",
        id="a dip inside the sustain window resets it",
    ),
    pytest.param(
        {"metric": "waiting_unacked"},
        obs(60, 2, unacked=60),
        PoolState(),
        5,
        "120 > 100",
        id="waiting plus unacked",
    ),
    pytest.param(
        {"metric": "latency", "tiers": [{"above": 60, "replicas": 10}, {"below": 5, "replicas": 2}]},
        obs(10, 2, latency=90.0),
        PoolState(),
        10,
        "90 > 60",
        id="latency tier",
    ),
    pytest.param(
        {"tiers": None, "per_replica": {"value": 50}},
        obs(420, 2),
        PoolState(),
        9,
        "-> 9",
        id="per-replica ceil(420/50)",
    ),
    pytest.param(
        {"tiers": None, "per_replica": {"value": 50, "tolerance": 0.1}},
        obs(105, 2),
        PoolState(),
        2,
        "within",
        id="per-replica tolerance holds",
    ),
    pytest.param(
        {"min": 0, "tiers": None, "per_replica": {"value": 50, "activation": 20}},
        obs(15, 0),
        PoolState(),
        0,
        "activation",
        id="activation keeps zero",
    ),
    pytest.param(
        {"min": 0, "tiers": None, "per_replica": {"value": 50, "activation": 20}},
        obs(25, 0),
        PoolState(),
        1,
        "-> 1",
        id="activation wakes from zero",
    ),
]


@pytest.mark.parametrize(("overrides", "observation", "state", "desired", "reason"), CASES)
def test_decide_cases(
    overrides: dict[str, Any], observation: Observation, state: PoolState, desired: int, reason: str
) -> None:
    """Each rule of the decision, in isolation, gives the expected count and names itself in the reason."""
    decision = decide(pool(**overrides), observation, state, now=0.0)
    assert (decision.desired, reason in decision.reason) == (desired, True), decision.reason


def test_metric_failure_holds_and_counts() -> None:
    """A failed metric read holds the pool and counts consecutive failures."""
    p = pool()
    state = PoolState()
    for expected in (1, 2, 3):
        d = decide(p, Observation((), 4, metric_error="redis down"), state, now=0.0)
        assert (d.desired, d.state.consecutive_failures) == (4, expected)
        assert "redis down" in d.reason
        state = d.state
    ok = decide(p, obs(50, 4), state, now=15.0)
    assert ok.state.consecutive_failures == 0


def test_metric_failure_fixed_fallback_after_n() -> None:
    """With a fixed fallback, the pool goes to that count after N failed ticks, not before."""
    p = pool(on_metric_failure={"action": "fixed", "replicas": 5, "after": 2})
    first = decide(p, Observation((), 2, metric_error="x"), PoolState(), now=0.0)
    second = decide(p, Observation((), 2, metric_error="x"), first.state, now=15.0)
    assert (first.desired, second.desired) == (2, 5)
    assert "fallback" in second.reason


def test_unknown_latency_is_a_metric_failure() -> None:
    """A latency pool whose queue has unstamped messages holds instead of reading the latency as 0."""
    p = pool(metric="latency", tiers=[{"above": 60, "replicas": 10}, {"below": 5, "replicas": 2}])
    d = decide(p, obs(30, 4, latency=None), PoolState(), now=0.0)
    assert d.desired == 4
    assert "unknown" in d.reason


def test_unknown_current_holds() -> None:
    """When the backend cannot say how many replicas run, nothing is decided to act on."""
    d = decide(pool(), Observation((QueueStats("fast", 900),), None, backend_error="daemon down"), PoolState(), 0.0)
    assert d.direction is Direction.HOLD
    assert "daemon down" in d.reason


def test_missing_queue_reading_is_a_failure() -> None:
    """A pool whose queue is absent from the observation holds rather than reading it as empty."""
    d = decide(pool(), Observation((QueueStats("other", 900),), 3), PoolState(), 0.0)
    assert d.desired == 3
    assert "no reading for queue(s) fast" in d.reason


def test_history_is_pruned_to_the_longest_window() -> None:
    """History keeps what the longest window needs plus the one sample that was in force at its start."""
    history = tuple((float(t), 2) for t in range(0, 1000, 15))
    pruned = prune_history(history, now=1000.0, keep=300.0)
    assert pruned[0][0] <= 700.0 < pruned[1][0]
    assert window_values(pruned, 1000.0, 300.0, current=7)[0] == 2


def test_state_round_trips_through_json() -> None:
    """The state written to Redis reads back identical."""
    state = PoolState(
        last_scale_up=1.5, last_scale_down=None, recommendations=((1.0, 3), (2.0, 4)), consecutive_failures=2
    )
    assert PoolState.from_json(state.to_json()) == state


# --- the seed's burst, tick by tick ----------------------------------------------------------------------


def run_trace(p: PoolPolicy, depths: list[int], *, current: int, interval: float = 15.0) -> list[int]:
    """Drive decide() as the loop does (acting on every change) and return the count after each tick."""
    state, counts = PoolState(), []
    for i, depth in enumerate(depths):
        now = i * interval
        d = decide(p, obs(depth, current), state, now)
        state = d.state
        if d.direction is not Direction.HOLD:
            state = state.after_action(d.direction, now)
            current = d.desired or current
        counts.append(current)
    return counts


def test_seed_burst_path() -> None:
    """Burst: 2 -> 10 on the first tick above 500, hold while draining, 2 only after cooldown and window."""
    depths = [0] * 4 + [800] * 8 + [300] * 4 + [50] * 8 + [5] * 40
    counts = run_trace(pool(), depths, current=2)
    assert counts[:4] == [2] * 4
    assert counts[4] == 10
    first_two = counts.index(2, 5)
    # 10 -> 5 -> 2 happens only after 5 minutes of lower recommendations (stabilization).
    assert 10 in counts[4:16]
    assert first_two * 15 >= (24 * 15) + 300 - 15
    assert set(counts[first_two:]) == {2}


# --- properties -------------------------------------------------------------------------------------------

tier_policies = st.builds(
    lambda lo, hi, b1, b2, r_low, r_mid, step_up, step_down, up_cd, down_cd, stab: pool(
        min=lo,
        max=hi,
        tiers=[
            {"above": b1 + b2, "replicas": hi},
            {"above": b1, "replicas": max(lo, min(hi, r_mid))},
            {"below": max(1, b1 // 4), "replicas": lo},
        ],
        max_step={"up": step_up, "down": step_down},
        cooldown={"up": up_cd, "down": down_cd},
        stabilization=stab,
    ),
    st.integers(0, 5),
    st.integers(5, 30),
    st.integers(8, 400),
    st.integers(1, 400),
    st.integers(0, 5),
    st.integers(0, 30),
    st.none() | st.integers(1, 10),
    st.none() | st.integers(1, 10),
    st.integers(0, 120),
    st.integers(0, 600),
    st.integers(0, 600),
)
target_policies = st.builds(
    lambda lo, span, value, tol: pool(
        min=lo, max=lo + span, tiers=None, per_replica={"value": value, "tolerance": tol}
    ),
    st.integers(0, 5),
    st.integers(0, 30),
    st.integers(1, 200),
    st.floats(0, 0.5),
)
policies = tier_policies | target_policies
states = st.builds(
    lambda up, down, recs, fails, up_to: PoolState(
        last_scale_up=up, last_scale_down=down, recommendations=tuple(sorted(recs)), consecutive_failures=fails,
        last_scale_up_to=up_to,
    ),
    st.none() | st.floats(-1000, 0),
    st.none() | st.floats(-1000, 0),
    st.lists(st.tuples(st.floats(-1000, 0), st.integers(0, 40)), max_size=20),
    st.integers(0, 5),
    st.none() | st.integers(0, 40),
)


@settings(max_examples=400, deadline=None)
@given(policies, states, st.integers(0, 5000), st.integers(0, 40))
def test_result_within_bounds(p: PoolPolicy, state: PoolState, depth: int, current: int) -> None:
    """Whatever the input, an enabled pool's decided count is within [min, max]."""
    d = decide(p, obs(depth, current), state, now=0.0)
    assert d.desired is not None
    assert p.min <= d.desired <= p.max


@settings(max_examples=400, deadline=None)
@given(policies, states, st.integers(0, 5000), st.integers(0, 40))
def test_cooldowns_and_window_respected(p: PoolPolicy, state: PoolState, depth: int, current: int) -> None:
    """No scale-up inside the up-cooldown; no scale-down inside the down-cooldown or below the window's high."""
    now = 0.0
    current = min(max(current, p.min), p.max)  # out-of-bounds counts are corrected at once by design
    d = decide(p, obs(depth, current), state, now)
    if d.direction is Direction.UP and state.last_scale_up is not None and now - state.last_scale_up < p.cooldown.up:
        # Within the up-cooldown only a count above the last scale-up's, with no scale-down since, goes ahead.
        assert state.last_scale_up_to is not None and d.desired is not None
        assert d.desired > state.last_scale_up_to
        assert state.last_scale_down is None or state.last_scale_down < state.last_scale_up
    if d.direction is Direction.DOWN:
        last = [t for t in (state.last_scale_up, state.last_scale_down) if t is not None]
        if last:
            assert now - max(last) >= p.cooldown.down
        assert d.desired is not None
        assert d.desired >= max(window_values(d.state.recommendations, now, p.stabilization, current)) or (
            p.max_step.down is not None and d.desired == current - p.max_step.down
        )


@settings(max_examples=300, deadline=None)
@given(tier_policies, st.integers(0, 40), st.lists(st.floats(0, 1), min_size=1, max_size=40))
def test_hold_band_never_changes_count(p: PoolPolicy, current: int, positions: list[float]) -> None:
    """A depth that stays inside the hold band never changes a count already within its neighbouring tiers."""
    assert p.tiers is not None
    low_bound, high_bound = p.tiers[2].bound, p.tiers[1].bound
    low_count, high_count = p.tiers[2].replicas, p.tiers[1].replicas
    current = min(max(current, low_count), high_count)
    state = PoolState()
    for i, x in enumerate(positions):
        depth = int(low_bound + x * (high_bound - low_bound))
        d = decide(p, obs(depth, current), state, now=i * 15.0)
        assert d.desired == current, d.reason
        state = d.state


@settings(max_examples=300, deadline=None)
@given(policies, states, st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 40))
def test_more_work_never_fewer_replicas(p: PoolPolicy, state: PoolState, a: int, b: int, current: int) -> None:
    """From the same state, a deeper queue never yields fewer replicas than a shallower one."""
    less, more = sorted((a, b))
    d_less = decide(p, obs(less, current), state, now=0.0)
    d_more = decide(p, obs(more, current), state, now=0.0)
    assert d_less.desired is not None and d_more.desired is not None
    assert d_more.desired >= d_less.desired


def test_decide_is_pure() -> None:
    """The same inputs give the same decision, and the input state is not modified."""
    p, state = pool(), PoolState(recommendations=((-10.0, 5),))
    before = replace(state)
    assert decide(p, obs(600, 2), state, 0.0) == decide(p, obs(600, 2), state, 0.0)
    assert state == before
