"""StartBackoff: a scale-up whose replicas fail backs the pool off, doubling, reset by one that works."""

from __future__ import annotations

from autoscaler.backends.start_backoff import StartBackoff


def test_a_failed_round_blocks_then_doubles_then_a_good_round_resets() -> None:
    b = StartBackoff(base=30, ceiling=100, window=120)
    b.started("fast", ["a", "b"], now=0)
    assert b.observe("fast", {"a": "running", "b": "restarting"}, now=5) is not None
    assert "next try in 25s" in (b.blocked("fast", now=10) or "")
    assert b.blocked("fast", now=35) is None
    b.started("fast", ["c"], now=40)
    b.observe("fast", {"c": "failed"}, now=41)
    assert "next try in 1m" in (b.blocked("fast", now=41) or "")  # 60 s: doubled
    b.started("fast", ["d"], now=200)
    b.observe("fast", {"d": "failed"}, now=201)
    assert "next try in 1m40s" in (b.blocked("fast", now=201) or "")  # 120 capped at 100
    b.started("fast", ["e"], now=400)
    assert b.observe("fast", {"e": "running"}, now=530) is None  # ran through the window
    b.started("fast", ["f"], now=600)
    b.observe("fast", {"f": "failed"}, now=601)
    assert "next try in 30s" in (b.blocked("fast", now=601) or ""), "a good round did not reset the back-off"


def test_failures_after_the_window_or_of_other_containers_do_not_count() -> None:
    b = StartBackoff(base=30, window=60)
    b.started("fast", ["a"], now=0)
    assert b.observe("fast", {"a": "running", "old": "restarting"}, now=10) is None
    assert b.observe("fast", {"a": "failed"}, now=100) is None  # failed at work, not at start
    assert b.blocked("fast", now=100) is None
    assert b.observe("io", {"x": "failed"}, now=1) is None  # no round of io's
