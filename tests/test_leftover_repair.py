"""Which never-started containers a Compose pool's status removes, waits for, or leaves (review of issue 12).

A controller SIGKILLed between a clone's create and its start leaves the clone in `created`; nobody will
start it. Held for the full grace it froze the pool's scale-ups for a minute after the failover.
"""

from __future__ import annotations

from autoscaler.backends.compose_health import ReplicaHealth
from autoscaler.backends.compose_model import Replica, ServiceRef
from autoscaler.backends.start_backoff import StartBackoff

NOW = 1_000_000.0
TARGET = ServiceRef(project="p", service="worker")


def created(cid: str, *, age: float, clone: bool) -> Replica:
    labels = {"autoscaler.clone": "true"} if clone else {}
    return Replica.from_summary({"Id": cid * 64, "Names": [f"/p_worker_{cid}"], "State": "created",
                                 "Status": "Created", "Created": NOW - age, "Labels": labels})


def repair(replicas: list[Replica], *, starting: bool, read_only: bool = False) -> tuple[list[str], list[str]]:
    removed: list[str] = []
    health = ReplicaHealth(inspect=lambda _cid: {}, discard=lambda _cid, name: removed.append(name),
                           on_failure=None, backoff=StartBackoff(), created_grace=60, read_only=read_only,
                           clock=lambda: NOW)
    pending = health.repair_leftovers(TARGET, replicas, starting=starting)
    return [r.name for r in pending], removed


def test_an_abandoned_clone_is_removed_at_once() -> None:
    assert repair([created("a", age=2, clone=True)], starting=False) == ([], ["p_worker_a"])


def test_a_clone_of_a_scale_up_under_way_is_waited_for_then_removed() -> None:
    assert repair([created("a", age=2, clone=True)], starting=True) == (["p_worker_a"], [])
    assert repair([created("a", age=61, clone=True)], starting=True) == ([], ["p_worker_a"])


def test_a_container_compose_created_is_waited_for_then_left_alone() -> None:
    assert repair([created("c", age=2, clone=False)], starting=False) == (["p_worker_c"], [])
    assert repair([created("c", age=61, clone=False)], starting=False) == ([], [])


def test_read_only_status_removes_nothing_and_reports_young_clones_as_starting() -> None:
    young, old = created("a", age=2, clone=True), created("b", age=61, clone=True)
    assert repair([young, old], starting=False, read_only=True) == (["p_worker_a"], [])
