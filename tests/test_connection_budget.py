"""The PostgreSQL worst case (autoscaler.policy.connections): one sum, reused by the doctor and budget work."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from autoscaler.policy.connections import PoolConnections, worst_case_connections


def test_the_shipped_stack_sums_to_its_documented_budget() -> None:
    # stack/README.md: fast 10 x 8 + cpu 10 x 2 + io 10 x 20 + web 2 x 8 = 316.
    budget = worst_case_connections(
        [PoolConnections("fast", 10, 8), PoolConnections("cpu", 10, 2), PoolConnections("io", 10, 20)], web=16)
    assert budget.total == 316
    assert budget.explain() == "fast 10x8x1=80 + cpu 10x2x1=20 + io 10x20x1=200 + web 16 = 316"


def test_the_seeds_arithmetic_undershoots_once_concurrency_and_replicas_count() -> None:
    # The seed: "8 web workers x 5 + 6 Celery workers x 5 = 70". Six workers of concurrency 4, at a max of 6
    # replicas each, with 5 connections per process, are 6 x 4 x 5 = 120 for one pool alone.
    assert worst_case_connections([PoolConnections("w", 6, 4, 5)], web=40).total == 160


def test_no_pools_and_negatives_count_as_nothing() -> None:
    assert worst_case_connections([]).total == 0
    assert worst_case_connections([], web=-3).explain() == "0 = 0"
    assert worst_case_connections([PoolConnections("x", -1, 8)]).total == 0


@given(st.lists(st.tuples(st.integers(-5, 1000), st.integers(-5, 1000), st.integers(-5, 50)), max_size=20),
       st.integers(-10, 10_000))
def test_the_total_is_the_sum_of_its_terms(pools: list[tuple[int, int, int]], web: int) -> None:
    shares = [PoolConnections(f"p{i}", *p) for i, p in enumerate(pools)]
    budget = worst_case_connections(shares, web=web)
    assert budget.total == sum(max(0, a) * max(0, b) * max(0, c) for a, b, c in pools) + max(0, web)
    assert budget.explain().endswith(f"= {budget.total}")
