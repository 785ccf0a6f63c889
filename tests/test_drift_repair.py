"""A count someone else lowered is restored at the next tick, cooldowns or not (Trust boundaries II, 4).

Re-running `docker compose up -d` while a pool runs 10 makes Compose go back to the file's `scale: 2`; the
controller used to wait out its up-cooldown before restoring 10. Cooldowns pace changes of the
recommendation, not the repair of a count someone else changed.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoscaler.backends.memory import MemoryBackend
from autoscaler.policy.decide import decide
from autoscaler.policy.strategies import recommend
from autoscaler.types import Direction, PoolState, StartBackoffState
from tests.test_decide import obs, pool
from tests.test_loop import POLICY, Clock, make_controller, publish

NOW = 1_000_000.0


def test_a_lowered_count_is_restored_inside_the_up_cooldown() -> None:
    p = pool(cooldown={"up": "30s", "down": "5m"}, sustain="10s")
    state = PoolState(last_scale_up=NOW - 5, recommendations=((NOW - 5, 10),), target=10)
    decision = decide(p, obs(650, 2), state, NOW)
    assert (decision.direction, decision.desired) == (Direction.UP, 10)
    assert decision.details == {"repair": True}
    assert "below the 10 this controller set" in decision.reason
    # The repair starts no cooldown: a genuine scale-up right after it is not held by it.
    after = decision.state.after_action(decision.direction, NOW, decision.desired, repair=True)
    assert (after.last_scale_up, after.target) == (NOW - 5, 10)


def test_a_repair_restores_only_what_is_still_wanted() -> None:
    p = pool(cooldown={"up": "30s", "down": "5m"})
    state = PoolState(last_scale_up=NOW - 5, recommendations=((NOW - 5, 10),), target=10)
    decision = decide(p, obs(150, 2), state, NOW)  # the >100 tier: 5
    assert (decision.desired, decision.details) == (5, {"repair": True})


def test_a_lowered_count_that_is_what_is_wanted_anyway_is_not_a_repair_later() -> None:
    p = pool(cooldown={"up": "30s", "down": "5m"})
    state = PoolState(last_scale_up=NOW - 5, recommendations=((NOW - 5, 10),), target=10)
    held = decide(p, obs(5, 2), state, NOW)  # the <10 tier: 2, which is what runs
    assert held.direction is Direction.HOLD and held.state.target == 2
    # Later work rises: an ordinary scale-up, paced by the up-cooldown.
    later = decide(p, obs(650, 2), held.state, NOW + 1)
    assert later.direction is Direction.HOLD and "up-cooldown" in later.reason


@pytest.mark.redis
def test_the_loop_restores_a_count_lowered_from_outside_at_the_next_tick(
    redis_url: str, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    clock = Clock()
    publish(redis_url, "fast", 650)
    backend = MemoryBackend({"worker-fast": 2, "worker-io": 2})
    controller = make_controller(redis_url, policy, backend, clock=clock)
    assert controller.tick().pools[0].decision.desired == 10
    backend.replicas["worker-fast"] = 2  # `compose up -d` went back to the file's scale: 2
    clock.now += 2  # deep inside the 30 s up-cooldown
    fast = controller.tick().pools[0]
    assert (fast.decision.current, fast.decision.desired) == (2, 10)
    assert fast.action is not None and fast.action.ok and backend.replicas["worker-fast"] == 10
    assert controller.states is not None and controller.states["fast"].last_scale_up == clock.now - 2


def test_a_repair_never_holds_back_a_scale_up_beyond_the_old_count() -> None:
    """Review: one crash-looping replica kept current below target, and the repair capped every scale-up."""
    p = pool(cooldown={"up": "30s", "down": "5m"}, max=20, tiers=[{"above": 500, "replicas": 15},
                                                                 {"below": 10, "replicas": 2}])
    state = PoolState(last_scale_up=NOW - 60, recommendations=((NOW - 60, 5),), target=5)
    decision = decide(p, obs(650, 4), state, NOW)
    assert (decision.desired, decision.details) == (15, {})  # the ordinary scale-up, not a capped repair
    inside_cooldown = decide(p, obs(650, 4), replace(state, last_scale_up=NOW - 5), NOW)
    assert (inside_cooldown.desired, inside_cooldown.details) == (5, {"repair": True})


def test_a_paused_pool_forgets_the_count_it_had_set() -> None:
    held = decide(pool(enabled=False), obs(650, 2), PoolState(target=10), NOW)
    assert held.direction is Direction.HOLD and held.state.target is None


# -- issue 17, item 3: inside a hold band the lowered count used to be kept for good ---------------------------

# A wide hold band (10..500 waiting) in which the pool holds anything from 2 to 10.
HOLD_BAND = [{"above": 500, "replicas": 10}, {"below": 10, "replicas": 2}]


def test_a_replica_replaced_inside_a_tiers_hold_band_comes_back() -> None:
    """10 running, one replaced (unhealthy) or exited: 9. The band holds whatever runs, so 9 was kept for good."""
    p = pool(tiers=HOLD_BAND)
    state = PoolState(last_scale_up=NOW - 5, recommendations=((NOW - 5, 10),), target=10)
    decision = decide(p, obs(50, 9), state, NOW)
    assert (decision.direction, decision.desired, decision.details) == (Direction.UP, 10, {"repair": True})
    assert "below the 10 this controller set" in decision.reason


def test_a_replica_lost_inside_a_per_replica_tolerance_band_comes_back() -> None:
    """95 waiting at 10 per replica: 9 and 10 replicas are both within the 10% band, so 9 held itself."""
    p = pool(tiers=None, per_replica={"value": 10, "tolerance": 0.1})
    state = PoolState(last_scale_up=NOW - 5, recommendations=((NOW - 5, 10),), target=10)
    decision = decide(p, obs(95, 9), state, NOW)
    assert (decision.desired, decision.details) == (10, {"repair": True})


def test_inside_a_band_that_would_shrink_the_target_only_what_is_wanted_comes_back() -> None:
    """At 10 with 50 waiting the seed tiers go to the >100 tier's 5: lowered to 3, the pool comes back to 5."""
    state = PoolState(last_scale_up=NOW - 5, recommendations=((NOW - 5, 10),), target=10)
    decision = decide(pool(), obs(50, 3), state, NOW)
    assert (decision.desired, decision.details) == (5, {"repair": True})
    kept = decide(pool(), obs(50, 6), state, NOW)  # 6 is above what is wanted at 10: nothing to restore
    assert kept.details == {} and kept.state.target == 6


def test_a_repair_waits_out_the_start_back_off() -> None:
    """Replicas that keep failing at start are not recreated every tick by the repair (item 7 paces it)."""
    backing_off = StartBackoffState(failed_rounds=2, until=NOW + 40, why="2 of 2 new replicas exited within 1s")
    state = PoolState(target=10, backoff=backing_off)
    held = decide(pool(tiers=HOLD_BAND), obs(50, 9), state, NOW)
    assert held.direction is Direction.HOLD and held.details == {}
    assert "backing off, next try in 40s" in held.reason and held.state.target == 10
    later = decide(pool(tiers=HOLD_BAND), obs(50, 9), held.state, NOW + 41)
    assert (later.desired, later.details) == (10, {"repair": True})


@given(target=st.integers(3, 10), lowered=st.integers(2, 9), waiting=st.integers(10, 500),
       since_up=st.floats(0, 1000), history=st.lists(st.tuples(st.floats(0, 600), st.integers(2, 10)), max_size=4))
def test_a_pool_lowered_from_outside_in_a_hold_band_returns_to_its_target(
    target: int, lowered: int, waiting: int, since_up: float, history: list[tuple[float, int]]
) -> None:
    current = min(lowered, target - 1)  # at or above min 2: below it, min comes first
    state = PoolState(last_scale_up=NOW - since_up, recommendations=tuple(sorted((NOW - a, n) for a, n in history)),
                      target=target)
    decision = decide(pool(tiers=HOLD_BAND), obs(waiting, current), state, NOW)
    assert (decision.desired, decision.details) == (target, {"repair": True}), decision.reason


@given(target=st.integers(0, 50), current=st.integers(0, 50), waiting=st.integers(0, 5000),
       tiers=st.sampled_from([None, HOLD_BAND]), since_up=st.floats(0, 100))
def test_a_repair_restores_no_more_than_is_wanted_at_the_count_it_had_or_at_the_target(
    target: int, current: int, waiting: int, tiers: list[dict[str, int]] | None, since_up: float
) -> None:
    """A queue that emptied (or any depth) never gets a pool restored above what the strategy wants."""
    p = pool(tiers=tiers) if tiers else pool()
    decision = decide(p, obs(waiting, current), PoolState(last_scale_up=NOW - since_up, target=target), NOW)
    if decision.details.get("repair"):
        assert decision.desired is not None
        wanted = max(min(max(recommend(p, waiting, n)[0], p.min), p.max) for n in (current, target))
        assert current < decision.desired <= min(target, wanted)
    if waiting < 10 and current >= p.min:  # emptied: the <10 tier's 2 is all that is wanted
        assert decision.desired is not None and decision.desired <= current
