"""`max` is a cap while victims drain (Trust boundaries III, 2), and a Swarm spec is lowered at once (11).

Replicas being stopped (a warm shutdown can take the pool's whole `stop_timeout`) still run: they count toward
`max`, with `surge` extra allowed only while they drain. The decision caps a scale-up (a hold, or a smaller
scale-up, with the reason); the Swarm backend never writes a spec above the cap even when asked. Pure
decisions, and the Swarm backend over a scripted engine (the real Compose case is
tests/docker/test_compose_max_cap.py).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from autoscaler.backends.base import TargetStatus
from autoscaler.backends.memory import MemoryBackend
from autoscaler.backends.swarm import SwarmBackend, count_tasks
from autoscaler.backends.swarm_drain import drain_spec
from autoscaler.gate import gate
from autoscaler.loop import Controller
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.decide import decide
from autoscaler.policy.load import PolicyError, parse_policy
from autoscaler.policy.model import MAX_REPLICAS, BrokerOptions, Policy, PoolPolicy
from autoscaler.policy.watch import FixedPolicy
from autoscaler.sources.celery_redis import CeleryRedisSource
from autoscaler.state_store import MemoryStateStore
from autoscaler.types import Direction, Observation, PoolState, QueueStats

NOW = 1_796_132_400.0  # 2026-12-01T13:40:00Z


def pool(*, max_: int = 4, min_: int = 1, surge: int | None = None, swarm: bool = False) -> PoolPolicy:
    target = {"swarm": {"service": "s"}} if swarm else {"compose": {"service": "worker"}}
    body: dict[str, Any] = {
        "name": "fast", "target": target, "queues": ["fast"], "min": min_, "max": max_,
        "tiers": [{"above": 100, "replicas": max_}, {"below": 10, "replicas": min_}],
        "cooldown": {"up": "0s", "down": "0s"}, "stabilization": "0s", "stop_timeout": "60s",
    }
    if surge is not None:
        body["surge"] = surge
    return PoolPolicy.model_validate(body)


def observe(waiting: int, current: int, draining: int) -> Observation:
    return Observation(queues=(QueueStats("fast", waiting),), current=current, draining=draining)


# -- the decision ---------------------------------------------------------------------------------------


def test_a_scale_up_that_draining_replicas_would_push_past_max_holds_and_says_why() -> None:
    decision = decide(pool(), observe(500, current=1, draining=3), PoolState(), NOW)
    assert decision.direction is Direction.HOLD
    assert "3 draining count toward max 4" in decision.reason


def test_the_cap_leaves_room_for_a_smaller_scale_up() -> None:
    decision = decide(pool(), observe(500, current=1, draining=2), PoolState(), NOW)
    assert decision.desired == 2
    assert "2 draining count toward max 4" in decision.reason


def test_surge_allows_that_many_above_max_while_victims_drain_and_the_reason_names_it() -> None:
    decision = decide(pool(surge=2), observe(500, current=1, draining=3), PoolState(), NOW)
    assert decision.desired == 3  # 3 serving + 3 draining = max 4 + surge 2
    assert "surge 2" in decision.reason
    # Without victims, surge adds nothing: max is max.
    assert decide(pool(surge=2), observe(500, current=1, draining=0), PoolState(), NOW).desired == 4


def test_a_repair_or_min_is_capped_too_and_a_capped_repair_is_not_remembered_as_one() -> None:
    # Below min with 4 draining: min 2 would make 6 containers of a pool whose max is 4.
    decision = decide(pool(min_=2), observe(0, current=0, draining=4), PoolState(), NOW)
    assert decision.direction is Direction.HOLD and "4 draining count toward max 4" in decision.reason
    repaired = decide(pool(), observe(500, current=2, draining=2), PoolState(target=4), NOW)
    assert repaired.direction is Direction.HOLD and "repair" not in repaired.details


def test_scale_downs_and_holds_are_never_touched_by_the_cap() -> None:
    decision = decide(pool(), observe(0, current=3, draining=3), PoolState(), NOW)
    assert (decision.direction, decision.desired) == (Direction.DOWN, 1)


def test_surge_is_a_bounded_whole_number_of_the_policy() -> None:
    assert pool().surge == 0
    for bad in (-1, MAX_REPLICAS + 1, 1.5, "x"):
        with pytest.raises(ValidationError, match="surge"):
            pool(surge=bad)  # type: ignore[arg-type]
    text = """
pools:
  fast:
    target: {compose: {service: worker}}
    queues: [fast]
    min: 1
    max: 4
    surge: -1
    tiers: [{above: 100, replicas: 4}]
"""
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source="p.yaml")
    assert [str(p).split(": ")[:2] for p in info.value.problems] == [["p.yaml:8", "pools.fast.surge"]]


# -- property: counted containers never exceed max + surge ------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    max_=st.integers(1, 12),
    surge=st.integers(0, 4),
    steps=st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 5)), min_size=1, max_size=40),
)
def test_serving_plus_draining_never_exceeds_max_plus_surge(
    max_: int, surge: int, steps: list[tuple[int, int]]
) -> None:
    """A pool driven by swinging depths: every scale-down turns serving replicas into busy victims that exit
    only now and then (`exits` of them per step); every scale-up creates what the decision asked for."""
    policy = PoolPolicy.model_validate({
        "name": "p", "target": {"compose": {"service": "w"}}, "queues": ["q"], "min": 0, "max": max_,
        "surge": surge, "per_replica": {"value": 50, "tolerance": 0},
        "cooldown": {"up": "0s", "down": "0s"}, "stabilization": "0s",
    })
    serving, draining, state, now = 0, 0, PoolState(), NOW
    for depth, exits in steps:
        now += 15
        draining = max(0, draining - exits)
        observation = Observation(queues=(QueueStats("q", depth),), current=serving, draining=draining)
        decision = gate(decide(policy, observation, state, now), TargetStatus(running=serving, draining=draining))
        assert decision.desired is not None
        if decision.direction is Direction.DOWN:
            draining += serving - decision.desired
        serving = decision.desired
        state = decision.state.after_action(decision.direction, now, decision.desired)
        assert serving + draining <= max_ + surge, decision.reason
        if serving + draining > max_:
            assert f"surge {surge}" in decision.reason or decision.direction is not Direction.UP


@given(max_=st.integers(0, 50), surge=st.integers(0, 10), final=st.integers(0, 60), alive=st.integers(0, 60))
def test_a_drain_never_writes_a_spec_past_max_plus_surge(max_: int, surge: int, final: int, alive: int) -> None:
    policy = PoolPolicy.model_validate({
        "name": "p", "target": {"swarm": {"service": "s"}}, "queues": ["q"], "min": 0, "max": max_, "surge": surge,
        "per_replica": {"value": 1},
    })
    spec = drain_spec(policy, final, alive)
    assert spec <= max_ + min(surge, alive)
    assert spec == final + alive or spec == max_ + min(surge, alive)  # as asked, unless that passes the cap


# -- Swarm: the spec during a drain ---------------------------------------------------------------------


class ScriptedSwarm:
    """One replicated service's spec and tasks, as the Engine API shows them, and its Celery workers (all
    idle). Writing the spec starts or stops tasks as Swarm would; a victim exits when the test says so."""

    def __init__(self, replicas: int, *, tasks: list[dict[str, Any]] | None = None) -> None:
        self.spec = replicas
        self.specs: list[int] = [replicas]
        self.next = 0
        self.running: list[str] = []
        self.fixed_tasks = tasks
        self.lock = threading.Lock()
        self.shutdowns: list[str] = []
        self._converge()

    # the Engine API, as SwarmBackend calls it through DockerConnection.call
    def call(self, _what: str, fn: Any, **_kwargs: Any) -> Any:
        return fn(self)

    def check_fence(self, _what: str) -> None:
        return None

    def close(self) -> None:
        return None

    @property
    def api(self) -> ScriptedSwarm:
        return self

    def inspect_service(self, _name: str) -> dict[str, Any]:
        with self.lock:
            return {"ID": "svc", "Version": {"Index": len(self.specs)}, "Spec": {
                "Name": "s", "Labels": {"autoscaler.pool": "fast"}, "Mode": {"Replicated": {"Replicas": self.spec}},
                "TaskTemplate": {"ContainerSpec": {}},
            }}

    def tasks(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        if self.fixed_tasks is not None:
            return self.fixed_tasks
        with self.lock:
            return [{"ID": t, "DesiredState": "running", "CreatedAt": "", "Status": {
                "State": "running", "ContainerStatus": {"ContainerID": t.ljust(12, "0")}}} for t in self.running]

    def _url(self, _template: str, _service: str) -> str:
        return "/services/svc/update"

    def _post_json(self, _url: str, *, data: dict[str, Any], params: dict[str, Any]) -> None:
        with self.lock:
            self.spec = data["Mode"]["Replicated"]["Replicas"]
            self.specs.append(self.spec)
            self._converge()

    def _raise_for_status(self, _response: Any) -> None:
        return None

    def _converge(self) -> None:
        while len(self.running) < self.spec:
            self.running.append(f"t{self.next:02d}")
            self.next += 1
        del self.running[self.spec:]  # Swarm chooses (never reached while the drain keeps victims counted)

    # Celery's remote control
    def workers(self, _pool: PoolPolicy, *, hosts: object = None) -> dict[str, bool]:
        with self.lock:
            return {f"w@{t.ljust(12, '0')}": False for t in self.running}

    def shutdown(self, nodenames: list[str]) -> None:
        self.shutdowns.extend(nodenames)

    def exit(self, nodename: str) -> None:
        with self.lock:
            self.running = [t for t in self.running if not nodename.endswith(t.ljust(12, "0"))]


def swarm_backend(engine: ScriptedSwarm) -> SwarmBackend:
    backend = SwarmBackend(docker_connection=engine, control=engine)  # type: ignore[arg-type]
    assert backend._drainer is not None
    backend._drainer._poll = 0.02
    return backend


def watcher_steps(engine: ScriptedSwarm, steps: int = 5) -> None:
    """Let the drain watcher look at the tasks `steps` more times."""
    seen = 0
    original = engine.tasks

    def counting(filters: dict[str, Any]) -> list[dict[str, Any]]:
        nonlocal seen
        seen += 1
        return original(filters)

    engine.tasks = counting  # type: ignore[method-assign]
    deadline = time.monotonic() + 10
    while seen < steps:
        assert time.monotonic() < deadline, "the drain watcher stopped looking"
        time.sleep(0.01)
    engine.tasks = original  # type: ignore[method-assign]


@pytest.mark.parametrize("surge", [None, 2])
def test_the_swarm_spec_never_exceeds_max_plus_surge_during_a_drain(surge: int | None) -> None:
    """max 10, 10 running, scaled to 5 (5 busy victims), then asked for 10 again as the depth swings: the
    spec went to 15. Asked directly (the decision caps it first): the backend keeps the spec <= max + surge."""
    policy = pool(max_=10, surge=surge, swarm=True)
    surge = surge or 0
    engine = ScriptedSwarm(10)
    backend = swarm_backend(engine)
    try:
        backend.scale(policy, current=10, desired=5)
        assert len(engine.shutdowns) == 5
        backend.scale(policy, current=5, desired=10)  # defence in depth: asked for more than the cap
        watcher_steps(engine)
        assert max(engine.specs) <= 10 + surge, engine.specs
        # What the loop sees, and decides, meanwhile: 5 (+ surge) serving, 5 draining: a hold that says why.
        status = backend.status(policy)
        assert (status.running, status.draining) == (5 + surge, 5)
        held = decide(policy, observe(500, current=status.running, draining=status.draining), PoolState(), NOW)
        assert held.direction is Direction.HOLD and "5 draining count toward max 10" in held.reason
        for node in engine.shutdowns[:3]:
            engine.exit(node)
        watcher_steps(engine)
        assert engine.spec == 10 + min(surge, 2) and max(engine.specs) <= 10 + surge, engine.specs
        for node in engine.shutdowns[3:]:
            engine.exit(node)
        deadline = time.monotonic() + 10
        while backend._drainer.final("fast") is not None:
            assert time.monotonic() < deadline, "the drain did not end"
            time.sleep(0.01)
        assert engine.spec == 10 and max(engine.specs) <= 10 + surge, engine.specs
    finally:
        backend.close()


# -- Swarm: a spec above what runs is lowered at once (item 11) -------------------------------------------


def test_lowering_a_spec_nothing_runs_under_is_done_at_once_not_after_the_start_bound() -> None:
    """Spec 10, every task pending and none placed yet, an empty queue, min 2: 'current' is 0, so going to 2 read
    as a scale-up that waited for the 10 'starting' tasks (up to the 2-minute start bound) while the log line
    said desired=0. Lowering a spec toward what is wanted is never risky."""
    created = "2026-12-01T13:40:00Z"
    pending = [{"ID": f"t{i}", "DesiredState": "running", "CreatedAt": created, "Status": {"State": "pending"}}
               for i in range(10)]
    engine = ScriptedSwarm(10, tasks=pending)
    backend = SwarmBackend(docker_connection=engine, clock=lambda: NOW + 5)  # type: ignore[arg-type]
    policy = pool(max_=10, min_=2, swarm=True)
    status = backend.status(policy)
    assert (status.running, status.wanted, status.ready) == (0, 10, False)  # 10 still starting
    decision = gate(decide(policy, Observation((QueueStats("fast", 0),), current=0), PoolState(), NOW + 5), status)
    assert (decision.current, decision.desired) == (0, 2), decision.reason
    assert "waiting" not in decision.reason
    backend.scale(policy, current=0, desired=2)
    assert engine.spec == 2


def test_a_scale_up_above_the_spec_still_waits_for_starting_tasks() -> None:
    counts = count_tasks([{"DesiredState": "running", "CreatedAt": "", "Status": {"State": "pending"}}] * 3, now=NOW)
    status = TargetStatus(running=2, ready=not counts.starting, wanted=5, detail="3 starting")
    more = decide(pool(max_=10, swarm=True), Observation((QueueStats("fast", 500),), current=2), PoolState(), NOW)
    raised = gate(more, status)
    assert raised.direction is Direction.HOLD and "waiting: 3 starting" in raised.reason


# -- the loop: a replica replaced for being unhealthy drains like a victim --------------------------------


class OneUnhealthy(MemoryBackend):
    """A pool at max whose backend drains one unhealthy replica (as ComposeBackend.replace_unhealthy does)."""

    def replace_unhealthy(self, pool: PoolPolicy) -> int:
        self.replicas[pool.target.service] -= 1
        return 1

    def status(self, pool: PoolPolicy) -> TargetStatus:
        return TargetStatus(running=self.replicas[pool.target.service] + 1)  # still counts it as running


@pytest.mark.redis
@pytest.mark.parametrize(("surge", "desired"), [(0, 3), (1, 4)])
def test_the_replacement_of_an_unhealthy_replica_waits_for_it_unless_surge_allows(
    redis_url: str, surge: int, desired: int
) -> None:
    policy = Policy.model_validate({"interval": 1, "pools": {"fast": {
        "target": {"compose": {"service": "worker"}}, "queues": ["fast"], "min": 4, "max": 4, "surge": surge,
        "tiers": [{"below": 10, "replicas": 4}],
    }}})
    backend = OneUnhealthy({"worker": 3})
    source = CeleryRedisSource(url=redis_url, broker=BrokerOptions())
    controller = Controller(policies=FixedPolicy(policy), source=source, backend=backend, store=MemoryStateStore(),
                            metrics=Metrics())
    decision = controller.tick().pools[0].decision
    assert (decision.current, decision.desired) == (3, desired), decision.reason
    assert ("1 draining count toward max 4" in decision.reason) == (surge == 0)
    assert ("surge 1" in decision.reason) == (surge == 1)
    source.close()
