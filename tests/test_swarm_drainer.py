"""SwarmDrainer with a scripted engine and Celery (the real swarm test is tests/docker/test_swarm_drain.py):
a lower decision during a drain picks more idle victims, a decision taken as a drain ends is not lost, a
flaky daemon does not end a drain, and stored marks are trusted only within the pool's stop_timeout."""

from __future__ import annotations

import threading
import time
from typing import Any

from autoscaler.backends.base import BackendError
from autoscaler.backends.swarm_drain import SwarmDrainer
from autoscaler.policy.model import Policy, PoolPolicy

POOL: PoolPolicy = Policy.model_validate({"interval": 1, "pools": {"fast": {
    "target": {"swarm": {"service": "s"}}, "queues": ["fast"], "min": 1, "max": 20,
    "tiers": [{"above": 100, "replicas": 10}], "stop_timeout": "60s",
}}}).pools[0]
SERVICE = {"ID": "svc", "Spec": {"TaskTemplate": {"ContainerSpec": {}}}}


class Engine:
    """Tasks t0..tN, each running in a container whose hostname is h<i> (padded to 12), all idle."""

    def __init__(self, count: int) -> None:
        self.running = {f"t{i:02d}" for i in range(count)}
        self.spec = count
        self.shutdowns: list[str] = []
        self.fail_next = 0
        self.lock = threading.Lock()

    def tasks(self, _service: str = "") -> list[dict[str, Any]]:
        with self.lock:
            if self.fail_next:
                self.fail_next -= 1
                raise BackendError("cannot reach the Docker daemon (restarting)")
            return [{"ID": t, "DesiredState": "running", "CreatedAt": t,
                     "Status": {"State": "running", "ContainerStatus": {"ContainerID": f"h{t}".ljust(12, "0")}}}
                    for t in sorted(self.running)]

    def set_replicas(self, _pool: PoolPolicy, count: int) -> None:
        self.spec = count

    def workers(self, _pool: PoolPolicy) -> dict[str, bool]:
        return {f"w@{('h' + t).ljust(12, '0')}": False for t in self.running}

    def shutdown(self, nodenames: list[str]) -> None:
        self.shutdowns.extend(nodenames)


def drainer(engine: Engine, **kwargs: Any) -> SwarmDrainer:
    return SwarmDrainer(control=engine, list_tasks=engine.tasks, set_replicas=engine.set_replicas, poll=0.02,
                        **kwargs)


def wait(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_lower_decision_during_a_drain_chooses_more_victims() -> None:
    engine = Engine(10)
    d = drainer(engine)
    assert d.begin(POOL, SERVICE, engine.tasks(), desired=8)
    assert len(engine.shutdowns) == 2 and d.final("fast") == 8
    assert d.begin(POOL, SERVICE, engine.tasks(), desired=5)  # while the first two still run
    assert len(set(engine.shutdowns)) == 5, "the further scale-down must pick idle victims, not lower the spec"
    wait(lambda: engine.spec == 10)  # final 5 + 5 victims still running: Swarm is never asked to choose
    for node in list(engine.shutdowns):
        engine.running.discard(next(t for t in list(engine.running) if node.endswith(("h" + t).ljust(12, "0"))))
    wait(lambda: engine.spec == 5 and d.final("fast") is None)
    d.close()


def test_a_flaky_daemon_does_not_end_the_drain() -> None:
    engine = Engine(4)
    d = drainer(engine)
    assert d.begin(POOL, SERVICE, engine.tasks(), desired=3)
    engine.fail_next = 3
    time.sleep(0.2)
    assert d.final("fast") == 3, "the drain was abandoned after a daemon error"
    engine.running.discard(sorted(engine.running)[-1])
    wait(lambda: d.final("fast") is None and engine.spec == 3)
    d.close()


def test_a_retarget_as_the_drain_ends_is_applied() -> None:
    engine = Engine(4)
    d = drainer(engine)
    assert d.begin(POOL, SERVICE, engine.tasks(), desired=3)
    assert d.retarget("fast", 6)  # a scale-up decided while the victim shuts down
    engine.running.discard(sorted(engine.running)[-1])
    wait(lambda: d.final("fast") is None)
    assert engine.spec == 6


def test_stored_marks_are_trusted_only_within_stop_timeout() -> None:
    engine = Engine(3)
    clock = [1_000.0]
    d = drainer(engine, clock=lambda: clock[0])
    victim = sorted(engine.running)[0]
    d.resume(POOL, SERVICE, engine.tasks(), ((victim, 10**9),), replicas=3)  # a forged far-off deadline
    assert d.marks("fast") == ((victim, 1_060.0),)
    clock[0] = 1_061.0
    wait(lambda: d.final("fast") is None)
    assert engine.spec == 2  # given up on at stop_timeout: the count goes to final, Swarm chooses
    d.close()


def test_a_host_claimed_by_two_node_names_is_never_a_victim() -> None:
    engine = Engine(2)
    spoofed = {**engine.workers(POOL), "fake@" + ("ht00").ljust(12, "0"): False}
    engine.workers = lambda _pool: spoofed  # type: ignore[method-assign]
    d = drainer(engine)
    assert d.begin(POOL, SERVICE, engine.tasks(), desired=1)
    assert engine.shutdowns == ["w@" + "ht01".ljust(12, "0")]
    d.close()
