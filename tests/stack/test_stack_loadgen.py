"""Load shapes of the stack's load generator (pure functions)."""

from __future__ import annotations

import pytest

pytest.importorskip("django", reason="the stack's requirements (requirements/stack.lock) are not installed")

from reports.loadgen import Burst, Ramp, parse_burst, parse_ramp, send_offsets


def test_no_shape_sends_everything_at_once():
    """Without a shape every task is due at t=0."""
    assert send_offsets(3) == [0.0, 0.0, 0.0]


def test_constant_rate():
    """--rate R spaces tasks 1/R apart."""
    assert send_offsets(4, rate=2.0) == [0.0, 0.5, 1.0, 1.5]


def test_burst_groups_tasks():
    """--burst 2:5 sends two at a time every five seconds."""
    assert send_offsets(5, burst=Burst(2, 5.0)) == [0.0, 0.0, 5.0, 5.0, 10.0]


@pytest.mark.parametrize(
    "ramp",
    [
        pytest.param(Ramp(10.0, 100.0, 10.0), id="up"),
        pytest.param(Ramp(100.0, 10.0, 10.0), id="down"),
        pytest.param(Ramp(0.0, 50.0, 4.0), id="from-zero"),
        pytest.param(Ramp(20.0, 20.0, 3.0), id="flat"),
    ],
)
def test_ramp_is_monotonic_and_matches_the_integral(ramp):
    """Offsets never go back, and the number sent by the ramp's end is the area under the rate line."""
    offsets = send_offsets(2000, ramp=ramp)
    assert offsets == sorted(offsets)
    sent_by_end = sum(1 for offset in offsets if offset < ramp.seconds)
    assert sent_by_end == pytest.approx((ramp.start + ramp.end) / 2 * ramp.seconds, abs=1)
    if len(offsets) > sent_by_end + 1:
        assert offsets[-1] - offsets[-2] == pytest.approx(1 / ramp.end)


def test_parsers_and_errors():
    """Shapes parse from the command line; nonsense is refused."""
    assert parse_ramp("1:10:30") == Ramp(1.0, 10.0, 30.0)
    assert parse_burst("200") == Burst(200, 1.0)
    assert parse_burst("200:2.5") == Burst(200, 2.5)
    for bad in ("1:2", "0:0:5", "1:2:0"):
        with pytest.raises(ValueError, match="ramp"):
            parse_ramp(bad)
    with pytest.raises(ValueError, match="burst"):
        parse_burst("0:1")
    with pytest.raises(ValueError, match="at most one"):
        send_offsets(1, rate=1.0, burst=Burst(1, 1.0))
