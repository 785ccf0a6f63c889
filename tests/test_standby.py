"""Warm standbys, pure parts: the standby command, the node name, the decision's plan, the stored phases, and the
activation state machine over a scripted fleet of workers (crash between steps, a new leader takes over).

The real engine and real Celery workers: tests/docker/test_compose_standby.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.backends.compose_model import Replica
from autoscaler.backends.compose_standby import ACTIVATING, Standbys, node_name, private_queue
from autoscaler.clone_spec import ROLE_LABEL, STANDBY_QUEUE_PREFIX, StandbyRefusedError, standby_command
from autoscaler.policy.decide import decide
from autoscaler.policy.model import PoolPolicy
from autoscaler.types import Observation, PoolState, QueueStats, StandbyPlan, StartBackoffState

NOW = 1_796_132_400.0
NAME = "stack-worker-fast-7"
PRIVATE = STANDBY_QUEUE_PREFIX + NAME


# -- the standby's command ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("command", "expected"), [
    (["celery", "-A", "core", "worker", "-Q", "fast", "-n", "w@%h"],
     ["celery", "-A", "core", "worker", "-Q", PRIVATE, "-n", "w@%h"]),
    (["celery", "worker", "-Qfast,slow", "-c", "1"], ["celery", "worker", f"-Q{PRIVATE}", "-c", "1"]),
    (["celery", "worker", "--queues", "fast"], ["celery", "worker", "--queues", PRIVATE]),
    (["celery", "worker", "--queues=fast"], ["celery", "worker", f"--queues={PRIVATE}"]),
])
def test_the_queue_argument_is_replaced_by_the_private_queue(command: list[str], expected: list[str]) -> None:
    assert standby_command(command, None, name=NAME) == expected


@pytest.mark.parametrize(("command", "entrypoint", "where"), [
    (["celery", "worker", "-c", "1"], None, "Config.Cmd has no -Q/--queues argument"),
    (["celery", "worker", "-Q", "a", "--queues=b"], None, r"Config.Cmd\[4\] is a second"),
    (["celery", "worker", "-Q"], None, r"Config.Cmd\[2\] \(-Q\) is not followed"),
    (["celery", "worker", "-Q", "-c"], None, r"Config.Cmd\[2\] \(-Q\) is not followed"),
    (["celery", "-Q", "a", "worker"], None, r"Config.Cmd\[1\] sets the queues before"),
    (["celery", "worker", "--queues="], None, r"Config.Cmd\[2\] names no queue"),
    (["sh", "-c", "celery -A core worker -Q fast"], None, "no `worker` argument"),
    (["worker", "-Q", "a"], ["celery", "-Q", "b"], r"Config.Entrypoint\[1\]"),
    ("celery worker -Q fast", None, "not a list"),
])
def test_a_command_the_controller_does_not_understand_is_refused_saying_where(
    command: Any, entrypoint: Any, where: str
) -> None:
    with pytest.raises(StandbyRefusedError, match=where):
        standby_command(command, entrypoint, name=NAME)


_WORDS = st.sampled_from(["celery", "worker", "-A", "core", "-Q", "-Qfast", "--queues", "--queues=", "--queues=a,b",
                          "fast", "-n", "w@%h", "-c", "1", "", "-", "--", "sh", "-c", " -Q x"])


@settings(max_examples=500, deadline=None)
@given(command=st.one_of(st.lists(_WORDS, max_size=10), st.lists(st.text(max_size=8), max_size=6),
                         st.none(), st.integers(), st.text(max_size=20)),
       entrypoint=st.one_of(st.none(), st.lists(_WORDS, max_size=3)))
def test_any_command_gives_exactly_one_private_queue_or_a_located_refusal(command: Any, entrypoint: Any) -> None:
    try:
        rewritten = standby_command(command, entrypoint, name=NAME)
    except StandbyRefusedError as exc:
        refusal = str(exc)
        assert refusal.startswith(("Config.Cmd", "Config.Entrypoint")), refusal
        return
    assert len(rewritten) == len(command)
    differing = [i for i, (a, b) in enumerate(zip(command, rewritten, strict=True)) if a != b]
    assert len(differing) == 1, (command, rewritten)
    assert PRIVATE in rewritten[differing[0]]


@pytest.mark.parametrize(("command", "node"), [
    (["celery", "worker", "-n", "worker-fast@%h"], "worker-fast@abc123def456"),
    (["celery", "worker", "--hostname=x@%n.%d"], "x@abc123def456."),
    (["celery", "worker", "-nfoo"], "celery@foo"),
    (["celery", "worker"], "celery@abc123def456"),
    (["celery", "worker", "-n", "a%%b@%h"], "a%b@abc123def456"),
])
def test_the_node_name_is_celerys(command: list[str], node: str) -> None:
    assert node_name(command, "abc123def456") == node


# -- the decision's plan ------------------------------------------------------------------------------------

def pool(*, max_: int = 10, min_: int = 2, warm: int = 2, surge: int = 0, enabled: bool = True) -> PoolPolicy:
    return PoolPolicy.model_validate({
        "name": "fast", "target": {"compose": {"service": "worker"}}, "queues": ["fast"], "min": min_,
        "max": max_, "warm": warm, "surge": surge, "enabled": enabled,
        "tiers": [{"above": 500, "replicas": max_}, {"above": 100, "replicas": min(max_, max(min_, 5))},
                  {"below": 10, "replicas": min_}],
        "cooldown": {"up": "0s", "down": "0s"}, "stabilization": "0s", "stop_timeout": "60s",
    })


def decided(p: PoolPolicy, waiting: int, *, current: int, standby: int, draining: int = 0,
            state: PoolState | None = None) -> Any:
    observation = Observation((QueueStats("fast", waiting),), current, draining=draining, standby=standby)
    return decide(p, observation, state or PoolState(), NOW)


def test_a_scale_up_activates_standbys_first_and_boots_their_replacements() -> None:
    decision = decided(pool(), 1000, current=2, standby=2)
    assert (decision.desired, decision.standby) == (10, StandbyPlan(activate=2, boot=2))
    assert "standbys: 2 activated, 2 standby booted" in decision.reason


def test_a_scale_down_returns_replicas_to_standby_up_to_warm() -> None:
    decision = decided(pool(), 0, current=10, standby=1)
    assert (decision.desired, decision.standby) == (2, StandbyPlan(to_standby=1))


def test_missing_standbys_are_booted_on_a_hold_within_max_plus_warm() -> None:
    decision = decided(pool(), 0, current=2, standby=0)
    assert (decision.desired, decision.standby, decision.acts) == (2, StandbyPlan(boot=2), True)
    crowded = decided(pool(), 0, current=2, standby=0, draining=9)  # 2 + 9 draining: 1 left of max 10 + warm 2
    assert crowded.standby == StandbyPlan(boot=1)


def test_no_standby_is_booted_while_new_containers_keep_failing() -> None:
    backoff = StartBackoffState(failed_rounds=1, until=NOW + 30, why="exit 1")
    decision = decided(pool(), 0, current=2, standby=0, state=PoolState(backoff=backoff))
    assert not decision.standby


def test_standbys_above_warm_are_retired_and_a_paused_pool_is_left_alone() -> None:
    assert decided(pool(warm=1), 0, current=2, standby=3).standby == StandbyPlan(retire=2)
    assert not decided(pool(enabled=False), 1000, current=2, standby=2).standby
    assert not decided(pool(warm=0), 1000, current=2, standby=0).standby


def test_warm_is_refused_on_a_swarm_target_saying_where() -> None:
    with pytest.raises(ValueError, match="warm: warm standbys are only supported for Compose targets"):
        PoolPolicy.model_validate({"name": "s", "target": {"swarm": {"service": "s"}}, "queues": ["q"], "min": 0,
                                   "max": 2, "warm": 1, "tiers": [{"above": 1, "replicas": 2}]})


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_containers_never_exceed_max_plus_warm(data: st.DataObject) -> None:
    """Random bursts, drains ending, standbys crashing: replicas + standbys + draining stay within max + warm
    (+ surge while replicas drain), whatever the plan says in between."""
    max_ = data.draw(st.integers(1, 12))
    p = pool(max_=max_, min_=data.draw(st.integers(0, max_)), warm=data.draw(st.integers(0, 4)),
             surge=data.draw(st.integers(0, 2)))
    replicas, standbys, draining = p.min, 0, 0
    state = PoolState()
    for step in range(data.draw(st.integers(1, 25))):
        waiting = data.draw(st.sampled_from([0, 50, 200, 1000]))
        decision = decide(p, Observation((QueueStats("fast", waiting),), replicas, draining=draining,
                                         standby=standbys), state, NOW + step)
        plan, desired = decision.standby, decision.desired
        assert desired is not None
        activated = min(plan.activate, standbys)
        standbys -= activated
        if desired < replicas:
            returned = min(plan.to_standby, replicas - desired)
            standbys += returned
            draining += replicas - desired - returned
        replicas = desired
        standbys += plan.boot - plan.retire
        draining += plan.retire
        assert replicas + standbys + draining <= p.max + p.warm + (p.surge if draining else 0), (step, decision)
        state = decision.state.after_action(decision.direction, NOW + step, desired)
        draining -= data.draw(st.integers(0, draining))  # some drains end
        standbys -= data.draw(st.integers(0, min(standbys, 1)))  # a standby crashes


# -- the stored phases --------------------------------------------------------------------------------------

def test_the_phases_round_trip_and_anything_else_is_refused_saying_what() -> None:
    state = PoolState(standbys=(("a" * 64, "active"), ("b" * 64, ACTIVATING)))
    assert PoolState.from_json(state.to_json()) == state
    for bad in ([["a" * 64, "on"]], [["not-an-id", "active"]], [["a" * 64]], {"x": 1}, "active"):
        with pytest.raises(ValueError, match="standbys"):
            PoolState.from_json(json.dumps({"standbys": bad}))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.lists(st.one_of(st.text(max_size=70), st.integers(), st.none()), max_size=3),
                          st.text(max_size=5)), max_size=4))
def test_any_stored_standbys_parse_or_are_refused_naming_the_field(raw: Any) -> None:
    try:
        state = PoolState.from_json(json.dumps({"standbys": raw}))
    except ValueError as exc:
        refusal = str(exc)
        assert "standbys" in refusal
        return
    assert len(state.standbys) == len(raw)


# -- the activation state machine, over a scripted fleet of workers -------------------------------------------

class Killed(Exception):  # noqa: N818 - the controller's SIGKILL, between two steps
    pass


class Fleet:
    """Celery workers as remote control sees them: node -> queues consumed. `kill_after` sends that many
    calls, then the controller "dies" before reading the next reply (the call has reached the worker)."""

    def __init__(self) -> None:
        self.queues: dict[str, set[str]] = {}
        self.kill_after: int | None = None

    def _sent(self) -> None:
        if self.kill_after is not None:
            if self.kill_after == 0:
                raise Killed
            self.kill_after -= 1

    def add_consumer(self, node: str, queue: str) -> bool:
        self.queues[node].add(queue)
        self._sent()
        return True

    def cancel_consumer(self, node: str, queue: str) -> bool:
        self.queues[node].discard(queue)
        self._sent()
        return True

    def active_queues(self, nodes: list[str]) -> dict[str, set[str]]:
        return {n: set(self.queues[n]) for n in nodes if n in self.queues}

    def busy(self, nodes: list[str]) -> set[str] | None:
        return set()


def standby_replica(number: int) -> Replica:
    cid = f"{number:012x}" + "0" * 52
    return Replica(id=cid, name=f"p-worker-{number}", state="running", status="Up 1 minute (healthy)",
                   created=NOW + number, labels={"autoscaler.pool": "fast", ROLE_LABEL: "standby"})


def controller(fleet: Fleet, marks: tuple[tuple[str, str], ...] = ()) -> Standbys:
    def inspect(cid: str) -> dict[str, Any]:
        return {"Config": {"Cmd": ["celery", "worker", "-n", "w@%h"], "Hostname": cid[:12]},
                "HostConfig": {"Memory": 256 << 20}}

    standbys = Standbys(fleet, inspect=inspect, fence=lambda _what: None)
    standbys.book.restore("fast", marks)
    return standbys


@pytest.mark.parametrize("kill_after", [0, 1, 2])
def test_a_controller_killed_between_activation_steps_leaves_every_standby_in_a_known_state(kill_after: int) -> None:
    """Two pool queues, so an activation is two calls: killed before the first reply, between the two, after
    both (before the state write). The new leader knows each container as capacity or standby, and the
    containers stay the same ones (nothing created or lost)."""
    p = pool().model_copy(update={"queues": ["fast", "slow"]})
    fleet, replicas = Fleet(), [standby_replica(1), standby_replica(2)]
    for r in replicas:
        fleet.queues[f"w@{r.short_id}"] = {private_queue(r.name)}
    first = controller(fleet)
    first.split(p, replicas)
    saved = first.book.marks("fast")  # the state written by the last tick before the activation
    fleet.kill_after = kill_after
    with pytest.raises(Killed):
        first.activate(p, replicas, 2)
    fleet.kill_after = None

    leader = controller(fleet, saved)  # a new leader: the stored state, and the label on every standby
    leader.verify(p, replicas)
    capacity, standbys = leader.split(p, replicas)
    assert len(capacity) + len(standbys) == 2  # every container is exactly one of the two
    for r in capacity:
        assert fleet.queues[f"w@{r.short_id}"] & {"fast", "slow"}
    for r in standbys:  # a standby consumes none of the pool's queues: it can take no task
        assert not fleet.queues[f"w@{r.short_id}"] & {"fast", "slow"}
    # Activating again finishes what the first leader began (add_consumer is idempotent).
    leader.activate(p, standbys, len(standbys))
    assert all(fleet.queues[f"w@{r.short_id}"] >= {"fast", "slow"} for r in replicas)
    assert len(leader.split(p, replicas)[0]) == 2
    assert leader.report(p, leader.split(p, replicas)[1]) == 0


def test_an_idle_activated_standby_returns_to_its_private_queue() -> None:
    fleet, replica = Fleet(), standby_replica(3)
    node = f"w@{replica.short_id}"
    fleet.queues[node] = {private_queue(replica.name)}
    standbys = controller(fleet)
    assert standbys.activate(pool(), [replica], 1) == 1
    assert fleet.queues[node] == {private_queue(replica.name), "fast"}
    assert standbys.split(pool(), [replica]) == ([replica], [])
    assert standbys.give_back(pool(), [replica], 1, busy=None) == [replica]
    assert fleet.queues[node] == {private_queue(replica.name)}
    assert standbys.split(pool(), [replica]) == ([], [replica])
    assert standbys.report(pool(), [replica]) == 256 << 20


def test_a_scale_up_that_activates_standbys_creates_the_rest_of_the_count() -> None:
    """2 running + 2 standbys, a burst to 10: the 2 activated count once, so 6 new replicas are created (the
    backend once subtracted the activations twice and created 4: 8 running, and the next tick "repaired" it)."""
    from types import SimpleNamespace  # noqa: PLC0415

    from autoscaler.backends.compose import ComposeBackend  # noqa: PLC0415

    p = pool(max_=10, warm=2)
    labels = {"com.docker.compose.project": "p", "com.docker.compose.service": "worker-fast",
              "autoscaler.pool": "fast"}
    plain = [Replica(id=f"{n:064x}", name=f"p-worker-fast-{n}", state="running", status="Up 1 minute",
                     created=NOW + n, labels={**labels, "com.docker.compose.container-number": str(n)})
             for n in (1, 2)]
    replicas = [*plain, standby_replica(3), standby_replica(4)]
    fleet = Fleet()
    for r in replicas:
        fleet.queues[f"w@{r.short_id}"] = {"fast"} if r in plain else {private_queue(r.name)}
    connection = SimpleNamespace(check_fence=lambda _what: None, close=lambda: None)
    backend = ComposeBackend(docker_connection=connection, default_project="p",  # type: ignore[arg-type]
                             standby_control=fleet, clock=lambda: NOW + 100)
    backend._replicas = lambda _pool, _target: list(replicas)  # type: ignore[method-assign]
    backend._standbys._inspect = lambda cid: {  # type: ignore[method-assign]
        "Config": {"Cmd": ["celery", "worker", "-n", "w@%h"], "Hostname": cid[:12]}, "HostConfig": {}}
    created: dict[str, int] = {}

    def scale_up(_pool: PoolPolicy, _target: object, _replicas: object, *, count: int, standbys: int = 0) -> None:
        created.update(count=count, standbys=standbys)

    backend._cloner.scale_up = scale_up  # type: ignore[method-assign]
    backend.scale(p, current=2, desired=10, standby=StandbyPlan(activate=2, boot=2))
    assert created == {"count": 6, "standbys": 2}
