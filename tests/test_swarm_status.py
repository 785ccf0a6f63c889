"""Swarm status and the gate (Trust boundaries II, 2): a pool with tasks no node can take, or replicas in
warm shutdown, is never frozen. Pure: task lists as the Engine API gives them."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from autoscaler.backends.base import TargetStatus
from autoscaler.backends.swarm import count_tasks
from autoscaler.backends.swarm_drain import choose_victims
from autoscaler.gate import gate
from autoscaler.types import Decision, Direction, PoolState

NOW = 1_796_132_400.0  # 2026-12-01T13:40:00Z
CREATED_NOW = "2026-12-01T13:40:00.123456789Z"
CREATED_LONG_AGO = "2026-12-01T13:30:00.5Z"


def task(state: str, desired: str = "running", *, err: str = "", created: str = CREATED_NOW) -> dict[str, Any]:
    return {"DesiredState": desired, "CreatedAt": created, "Status": {"State": state, "Err": err}}


def test_tasks_no_node_can_take_are_unplaceable_not_starting() -> None:
    tasks = [task("running")] * 3 + [task("pending", err="no suitable node (insufficient resources on 1 node)")] * 7
    counts = count_tasks(tasks, now=NOW)
    assert (counts.running, counts.starting, counts.unplaceable) == (3, 0, 7)
    assert counts.unplaceable_reason == "no suitable node (insufficient resources on 1 node)"


def test_a_task_starting_for_longer_than_the_bound_stops_holding_the_pool() -> None:
    counts = count_tasks([task("preparing"), task("preparing", created=CREATED_LONG_AGO)], now=NOW + 1)
    assert (counts.starting, counts.unplaceable) == (1, 1)
    assert counts.unplaceable_reason.startswith("preparing for ")


def test_replicas_in_warm_shutdown_are_neither_counted_nor_waited_for() -> None:
    counts = count_tasks([task("running")] * 2 + [task("running", desired="shutdown")] * 2, now=NOW)
    assert (counts.running, counts.stopping, counts.starting) == (2, 2, 0)


def decision(current: int, desired: int, **details: object) -> Decision:
    return Decision("fast", current, desired, "r", PoolState(), details=details)


def test_a_scale_down_goes_ahead_whatever_is_starting_or_unplaceable() -> None:
    status = TargetStatus(running=3, ready=False, down_ready=True, wanted=10, unplaceable=7,
                          detail="7 cannot be placed (no suitable node)")
    gated = gate(decision(3, 2), status)
    assert (gated.direction, gated.desired) == (Direction.DOWN, 2)
    assert "7 cannot be placed" in gated.reason


def test_a_count_already_asked_for_is_not_asked_again() -> None:
    status = TargetStatus(running=3, wanted=10, unplaceable=7, detail="7 cannot be placed (...)")
    gated = gate(decision(3, 10, repair=True), status)
    assert gated.direction is Direction.HOLD and "10 already asked for" in gated.reason


def test_a_scale_up_waits_for_starting_tasks_and_forgets_it_was_a_repair() -> None:
    gated = gate(decision(2, 10, repair=True), TargetStatus(running=2, ready=False, detail="6 starting"))
    assert gated.direction is Direction.HOLD and "waiting: 6 starting" in gated.reason
    assert "repair" not in gated.details


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=10,
)
task_like = st.fixed_dictionaries({}, optional={
    "DesiredState": st.sampled_from(["running", "shutdown", "remove"]) | st.text(max_size=8),
    "CreatedAt": st.sampled_from([CREATED_NOW, CREATED_LONG_AGO, "", "garbage", "2026-13-45T99:99:99Z"]) | json_values,
    "Status": st.fixed_dictionaries({}, optional={
        "State": st.sampled_from(["running", "pending", "starting", "failed", "shutdown", "complete"]),
        "Err": st.none() | st.text(max_size=40),
    }),
})


@given(st.lists(task_like, max_size=30))
def test_any_task_list_is_counted_without_raising(tasks: list[dict[str, Any]]) -> None:
    counts = count_tasks(tasks, now=NOW)
    assert counts.running + counts.starting + counts.stopping + counts.failed + counts.unplaceable <= len(tasks)


def running_task(task_id: str, container: str, created: str) -> dict[str, Any]:
    return {"ID": task_id, "DesiredState": "running", "CreatedAt": created,
            "Status": {"State": "running", "ContainerStatus": {"ContainerID": container}}}


def test_victims_are_idle_workers_first_and_the_newest_among_them() -> None:
    tasks = [
        running_task("t1", "a" * 64, "2026-12-01T10:00:00Z"),
        running_task("t2", "b" * 64, "2026-12-01T11:00:00Z"),
        running_task("t3", "c" * 64, "2026-12-01T12:00:00Z"),
    ]
    nodes = {f"w@{'a' * 12}": False, f"w@{'b' * 12}": True, f"w@{'c' * 12}": False}
    assert choose_victims(tasks, nodes, count=1, spec_hostname="") == {"t3": f"w@{'c' * 12}"}
    assert set(choose_victims(tasks, nodes, count=2, spec_hostname="") or {}) == {"t1", "t3"}
    assert set(choose_victims(tasks, nodes, count=3, spec_hostname="") or {}) == {"t1", "t2", "t3"}


def test_no_victims_when_workers_cannot_be_matched_to_tasks() -> None:
    tasks = [running_task("t1", "a" * 64, "2026-12-01T10:00:00Z")]
    assert choose_victims(tasks, {"w@someone-else": False}, count=1, spec_hostname="") is None
    assert choose_victims(tasks, {f"w@{'a' * 12}": False}, count=1, spec_hostname="{{.Task.Name}}") is None


@given(st.lists(task_like, max_size=10), st.dictionaries(st.text(max_size=20), st.booleans(), max_size=10),
       st.integers(0, 12))
def test_victim_choice_never_raises_and_never_picks_more_than_asked(
    tasks: list[dict[str, Any]], nodes: dict[str, bool], count: int
) -> None:
    running = [{**t, "ID": f"t{i}"} for i, t in enumerate(tasks)]
    victims = choose_victims(running, nodes, count=count, spec_hostname="")
    assert victims is None or len(victims) == count
