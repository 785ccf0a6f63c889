"""SwarmDrainer with a scripted engine and Celery (the real swarm test is tests/docker/test_swarm_drain.py):
a lower decision during a drain picks more idle victims, a decision taken as a drain ends is not lost, a
flaky daemon does not end a drain, and stored marks are trusted only within the pool's stop_timeout."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from autoscaler.backends.base import BackendError
from autoscaler.backends.swarm_drain import SwarmDrainer
from autoscaler.leader import Fence, LeaderLock, Lease
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

    def workers(self, _pool: PoolPolicy, *, hosts: object = None) -> dict[str, bool]:
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
    engine.workers = lambda _pool, **_kw: spoofed  # type: ignore[method-assign]
    d = drainer(engine)
    assert d.begin(POOL, SERVICE, engine.tasks(), desired=1)
    assert engine.shutdowns == ["w@" + "ht01".ljust(12, "0")]
    d.close()


class FencedEngine(Engine):
    """Every engine call checks the lease first, as `DockerConnection.call` does."""

    def __init__(self, count: int, fence: Fence) -> None:
        super().__init__(count)
        self.fence = fence
        self.writes: list[int] = []

    def tasks(self, _service: str = "") -> list[dict[str, Any]]:
        self.fence.check("list the tasks of swarm service svc")
        return super().tasks(_service)

    def set_replicas(self, _pool: PoolPolicy, count: int) -> None:
        self.fence.check("update the replicas of swarm service svc")
        self.writes.append(count)
        super().set_replicas(_pool, count)


def lease(url: str, name: str) -> LeaderLock:
    # Short timeouts, no retries: a paused Redis is an unanswered lease check within a fraction of a second.
    client = redis.Redis.from_url(url, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
    return LeaderLock(client, key="t17:leader", instance_id=name, ttl=60)


@pytest.mark.redis
def test_an_unanswered_lease_check_pauses_the_drain_until_the_lease_is_renewed(redis_url: str) -> None:
    lock = lease(redis_url, "a")
    fence = Fence(lock)
    assert lock.acquire_or_renew() is Lease.ACQUIRED
    engine = FencedEngine(4, fence)
    d = SwarmDrainer(control=engine, list_tasks=engine.tasks, set_replicas=engine.set_replicas, fence=fence.check,
                     poll=0.02)
    assert d.begin(POOL, SERVICE, engine.tasks(), desired=3)
    marks = d.marks("fast")
    assert len(marks) == 1
    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")  # the lease script is a write: it goes unanswered
    try:
        wait(lambda: fence.lost is not None)
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
    assert d.marks("fast") == marks, "a drain paused by one unanswered lease check must keep its marks"
    assert d.final("fast") == 3
    assert lock.acquire_or_renew() is Lease.RENEWED  # the controller's next tick: the lease is still this one's
    fence.rearm()
    engine.running.discard(marks[0][0])
    wait(lambda: d.final("fast") is None and engine.spec == 3)
    d.close()


@pytest.mark.redis
def test_a_drain_paused_while_another_replica_led_gives_way_to_the_stored_marks(
    redis_url: str, logs: list[str]
) -> None:
    lock_a, lock_b = lease(redis_url, "a"), lease(redis_url, "b")
    fence = Fence(lock_a)
    assert lock_a.acquire_or_renew() is Lease.ACQUIRED
    engine = FencedEngine(4, fence)
    d = SwarmDrainer(control=engine, list_tasks=engine.tasks, set_replicas=engine.set_replicas, fence=fence.check,
                     lease_term=fence.term, poll=0.02)
    assert d.begin(POOL, SERVICE, engine.tasks(), desired=3)
    victim = d.marks("fast")[0][0]
    # b takes over (a's lease lapsed), finishes a's drain from the stored marks and scales the pool up to 8.
    redis.Redis.from_url(redis_url).delete("t17:leader")
    assert lock_b.acquire_or_renew() is Lease.ACQUIRED
    wait(lambda: fence.lost is not None)
    engine.running.discard(victim)
    engine.running |= {"t10", "t11", "t12", "t13", "t14"}
    engine.spec = 8
    lock_b.release()
    # a leads again: what it remembers of the drain is stale; the stored state (no marks left) is the truth.
    assert lock_a.acquire_or_renew() is Lease.ACQUIRED
    fence.rearm()
    assert d.final("fast") is None and d.marks("fast") == () and d.draining("fast") == set()
    writes = len(engine.writes)
    wait(lambda: any("another replica may have led" in line for line in logs))
    assert engine.writes[writes:] == [], "the stale drain lowered the count another leader had set"
    assert engine.spec == 8
    # Marks another leader stored are followed afresh, not merged into the stale drain.
    new_victim = sorted(engine.running)[-1]
    d.resume(POOL, SERVICE, engine.tasks(), ((new_victim, time.time() + 30),), replicas=8)
    assert d.draining("fast") == {new_victim} and d.final("fast") == 7
    d.close()
