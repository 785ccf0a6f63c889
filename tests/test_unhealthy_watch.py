"""Which unhealthy Compose replica to replace, across pools and in small pools (review of issue 11, 4)."""

from __future__ import annotations

from autoscaler.backends.compose_health import ReplicaHealth
from autoscaler.backends.compose_model import Replica
from autoscaler.backends.start_backoff import StartBackoff
from autoscaler.policy.model import PoolPolicy


def pool(name: str) -> PoolPolicy:
    return PoolPolicy.model_validate({"name": name, "target": {"compose": {"service": name}}, "queues": [name],
                                      "min": 1, "max": 10, "tiers": [{"above": 100, "replicas": 10}]})


def replica(cid: str, health: str) -> Replica:
    return Replica.from_summary({"Id": cid * 12, "Names": [f"/{cid}"], "State": "running",
                                 "Status": f"Up 5 minutes ({health})", "Created": 0, "Labels": {}})


def health(clock: list[float]) -> ReplicaHealth:
    return ReplicaHealth(inspect=lambda _cid: {}, discard=lambda _cid, _name: None, on_failure=None,
                         backoff=StartBackoff(), created_grace=60, read_only=False, clock=lambda: clock[0])


def test_each_pool_keeps_its_own_timers() -> None:
    clock = [0.0]
    h = health(clock)
    fast = [replica("a", "unhealthy"), replica("b", "healthy"), replica("c", "healthy")]
    io = [replica("d", "healthy"), replica("e", "healthy")]
    replaced = []
    for _ in range(5):
        h.watch_unhealthy(pool("fast"), fast)
        replaced += h.to_replace(pool("fast"), grace=60)
        h.watch_unhealthy(pool("io"), io)  # used to wipe fast's timer
        replaced += h.to_replace(pool("io"), grace=60)
        clock[0] += 20
    assert [r.name for r in replaced] == ["a"]


def test_one_of_two_is_replaced_two_of_three_are_a_shared_cause() -> None:
    clock = [0.0]
    h = health(clock)
    pair = [replica("a", "unhealthy"), replica("b", "healthy")]
    h.watch_unhealthy(pool("fast"), pair)
    clock[0] = 61
    h.watch_unhealthy(pool("fast"), pair)
    assert [r.name for r in h.to_replace(pool("fast"), grace=60)] == ["a"]
    trio = [replica("x", "unhealthy"), replica("y", "unhealthy"), replica("z", "healthy")]
    h.watch_unhealthy(pool("io"), trio)
    clock[0] = 200
    h.watch_unhealthy(pool("io"), trio)
    assert h.to_replace(pool("io"), grace=60) == []
