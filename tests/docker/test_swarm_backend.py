"""SwarmBackend against a real single-node swarm: replica updates, opt-in label, global mode, version conflicts."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import docker
import pytest
from docker.types import ServiceMode
from dockertest import PREFIX, make_pool, unique_name, wait_until

from autoscaler.backends.base import BackendError, TargetStatus
from autoscaler.backends.docker_client import DockerConnection
from autoscaler.backends.swarm import SwarmBackend
from autoscaler.loop import Controller
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.model import BrokerOptions, Policy, PoolPolicy
from autoscaler.policy.watch import FixedPolicy
from autoscaler.sources.celery_redis import CeleryRedisSource
from autoscaler.state_store import MemoryStateStore

pytestmark = pytest.mark.docker

SLEEPER = ["python", "/app/sleeper.py"]


@pytest.fixture(scope="module")
def swarm(docker_env: Any) -> Iterator[docker.DockerClient]:
    """A swarm to test on: this engine's, or a single-node one initialised here and left at the end.

    Leaving is skipped while containers other than the tests' own run: on Docker 20.10 `swarm leave --force`
    was seen to detach running containers from their user-defined bridge networks ("Failed to remove swarm
    network ... on cluster leave"), which would break whatever else is using this engine.
    """
    client: docker.DockerClient = docker_env.client
    state = client.info()["Swarm"]["LocalNodeState"]
    initialised = state == "inactive"
    if initialised:
        client.swarm.init(advertise_addr="127.0.0.1")
    elif state != "active":
        pytest.fail(f"this engine's swarm is {state!r}; expected inactive or active", pytrace=False)
    yield client
    if not initialised:
        return
    others = sorted(str(c.name) for c in client.containers.list() if not str(c.name).startswith(PREFIX))
    if others:
        sys.stderr.write(f"\n[swarm] left this engine in swarm mode: leaving would cut {others} off their networks\n")
    else:
        client.swarm.leave(force=True)


@pytest.fixture
def services(swarm: docker.DockerClient, worker_image: str) -> Iterator[Any]:
    """Factory for uniquely named services running the sleeper; every one is removed afterwards."""
    created: list[Any] = []

    def make(*, labels: dict[str, str] | None = None, mode: ServiceMode | None = None, **kwargs: Any) -> Any:
        service = swarm.services.create(
            worker_image, command=SLEEPER, name=unique_name("s"), labels=labels or {},
            mode=mode or ServiceMode("replicated", replicas=1), stop_grace_period=2_000_000_000, **kwargs,
        )
        created.append(service)
        return service

    yield make
    for service in created:
        service.remove()
    # Swarm removes a service's task containers asynchronously: wait, so nothing outlives the test.
    names = [f"com.docker.swarm.service.name={service.name}" for service in created]
    wait_until(
        lambda: not any(swarm.api.containers(all=True, filters={"label": name}) for name in names),
        timeout=60, what="the services' task containers to be removed",
    )


@pytest.fixture
def backend() -> Iterator[SwarmBackend]:
    b = SwarmBackend(docker_connection=DockerConnection())
    yield b
    b.close()


def settle(backend: SwarmBackend, pool: PoolPolicy, replicas: int) -> TargetStatus:
    def settled() -> TargetStatus | None:
        status = backend.status(pool)
        return status if status.ready and status.running == replicas else None

    return wait_until(settled, timeout=90, what=f"swarm service to run {replicas} tasks")


def running_tasks(service: Any) -> int:
    return sum(1 for t in service.tasks() if t["DesiredState"] == "running" and t["Status"]["State"] == "running")


def test_scale_1_to_3_to_1(services: Any, backend: SwarmBackend) -> None:
    """The replica spec follows scale(); status is not ready until the running tasks match it."""
    service = services(labels={"autoscaler.pool": "swarmfast"})
    pool = make_pool("swarmfast", service=service.name, swarm=True)
    backend.check(pool)
    settle(backend, pool, 1)

    backend.scale(pool, current=1, desired=3)
    service.reload()
    assert service.attrs["Spec"]["Mode"]["Replicated"]["Replicas"] == 3
    assert backend.status(pool).wanted == 3  # asked for; `running` is what runs
    up = settle(backend, pool, 3)
    assert "3 wanted, 3 running" in up.detail
    assert running_tasks(service) == 3

    backend.scale(pool, current=3, desired=1)
    settle(backend, pool, 1)
    assert running_tasks(service) == 1


def test_a_global_service_is_refused(services: Any, backend: SwarmBackend) -> None:
    """A global-mode service fails check() and is never updated, even when labelled."""
    service = services(labels={"autoscaler.pool": "swarmglobal"}, mode=ServiceMode("global"))
    pool = make_pool("swarmglobal", service=service.name, swarm=True)
    version = service.attrs["Version"]["Index"]
    with pytest.raises(BackendError, match="runs in global mode; the autoscaler only scales replicated"):
        backend.check(pool)
    with pytest.raises(BackendError, match="global mode"):
        backend.scale(pool, current=1, desired=3)
    service.reload()
    assert service.attrs["Version"]["Index"] == version


def test_a_service_without_the_owner_label_is_refused(services: Any, backend: SwarmBackend) -> None:
    """Only a service label opts in: a container label alone fails check() with a hint about deploy.labels."""
    service = services(container_labels={"autoscaler.pool": "swarmfast"})
    pool = make_pool("swarmfast", service=service.name, swarm=True)
    with pytest.raises(BackendError, match=r"no service label autoscaler.pool=swarmfast .*deploy.labels"):
        backend.check(pool)


def test_a_missing_service_is_reported(swarm: docker.DockerClient, backend: SwarmBackend) -> None:
    """A pool naming a service that does not exist fails with the service's name."""
    name = unique_name("missing")
    with pytest.raises(BackendError, match=f"swarm service {name} .* does not exist"):
        backend.status(make_pool("ghost", service=name, swarm=True))


class _RacingBackend(SwarmBackend):
    """Lets someone else update the service between its read and its write, once: a real version conflict."""

    def __init__(self, *, service: Any) -> None:
        super().__init__(docker_connection=DockerConnection())
        self.service = service
        self.raced = 0
        self.writes = 0

    def _replicated_spec(self, pool: PoolPolicy) -> tuple[dict[str, Any], int]:
        info, replicas = super()._replicated_spec(pool)
        if not self.raced:
            self.raced += 1
            self.service.reload()
            self.service.update(labels={**self.service.attrs["Spec"]["Labels"], "touched": "yes"})
        return info, replicas

    def _update_replicas(self, info: dict[str, Any], desired: int) -> None:
        self.writes += 1
        super()._update_replicas(info, desired)


def test_a_concurrent_update_is_retried(services: Any) -> None:
    """An update that loses a version race ('update out of sequence') is re-read and applied."""
    service = services(labels={"autoscaler.pool": "swarmrace"})
    pool = make_pool("swarmrace", service=service.name, swarm=True)
    racing = _RacingBackend(service=service)
    try:
        racing.scale(pool, current=1, desired=2)
    finally:
        racing.close()
    service.reload()
    assert (racing.raced, racing.writes) == (1, 2)  # the first write was refused as out of sequence
    assert service.attrs["Spec"]["Mode"]["Replicated"]["Replicas"] == 2
    assert service.attrs["Spec"]["Labels"]["touched"] == "yes"


def test_a_scale_changes_only_the_count_and_restarts_no_task(
    swarm: docker.DockerClient, worker_image: str, backend: SwarmBackend
) -> None:
    """Trust boundaries II, 3: the first scale after a deploy used to write Docker's defaults into the task
    template (docker-py's fetch_current_spec), so Swarm rolled every running replica. The service is created
    with a minimal spec, as `docker stack deploy` leaves DNSConfig and RestartPolicy unset."""
    name = unique_name("minimal")
    spec = {
        "Name": name,
        "Labels": {"autoscaler.pool": "swarmkeep"},
        "TaskTemplate": {"ContainerSpec": {"Image": worker_image, "Command": SLEEPER, "StopGracePeriod": 2 * 10**9}},
        "Mode": {"Replicated": {"Replicas": 2}},
    }
    api: Any = swarm.api
    created = api._result(api._post_json(api._url("/services/create"), data=spec), json=True)
    service = swarm.services.get(created["ID"])
    try:
        pool = make_pool("swarmkeep", service=name, swarm=True)
        settle(backend, pool, 2)
        before = {t["ID"] for t in service.tasks() if t["Status"]["State"] == "running"}
        template = service.attrs["Spec"]["TaskTemplate"]

        backend.scale(pool, current=2, desired=3)
        settle(backend, pool, 3)
        service.reload()
        assert service.attrs["Spec"]["TaskTemplate"] == template
        assert "UpdateStatus" not in service.attrs
        still = {t["ID"] for t in service.tasks() if t["DesiredState"] == t["Status"]["State"] == "running"}
        assert before <= still, f"running tasks were replaced: {before - still}"
        assert not backend.status(pool).detail.count("rolling update")
    finally:
        service.remove()
        wait_until(
            lambda: not swarm.api.containers(all=True, filters={"label": f"com.docker.swarm.service.name={name}"}),
            timeout=60, what="the service's task containers to be removed",
        )


@pytest.mark.redis
def test_a_pool_with_tasks_no_node_can_take_scales_down_when_the_queue_empties(
    swarm: docker.DockerClient, services: Any, backend: SwarmBackend, redis_url: str
) -> None:
    """Trust boundaries II, 2: spec 10 with a memory reservation that lets 3 run; the queue is empty. The pool
    used to hold at 10 ('10 wanted, 3 running, 7 starting') for as long as the reservation stayed."""
    reservation = int(swarm.info()["MemTotal"] / 3.5)  # three fit on this node, the fourth does not
    service = services(
        labels={"autoscaler.pool": "swarmstuck"}, mode=ServiceMode("replicated", replicas=10),
        resources=docker.types.Resources(mem_reservation=reservation),
    )
    policy = Policy.model_validate({"interval": 1, "pools": {"swarmstuck": {
        "target": {"swarm": {"service": service.name}}, "queues": ["stuck"],
        "min": 2, "max": 10, "tiers": [{"above": 100, "replicas": 10}, {"below": 10, "replicas": 2}],
        "cooldown": {"up": "0s", "down": "0s"}, "stabilization": "0s",
    }}})
    pool = policy.pools[0]

    def stuck() -> TargetStatus | None:
        status = backend.status(pool)
        return status if status.running == 3 and status.unplaceable == 7 else None

    status = wait_until(stuck, timeout=90, what="3 tasks running and 7 that no node can take")
    assert status.ready and status.wanted == 10 and "7 cannot be placed (no suitable node" in status.detail

    metrics = Metrics()
    controller = Controller(
        policies=FixedPolicy(policy),
        source=CeleryRedisSource(url=redis_url, broker=BrokerOptions()), backend=backend,
        store=MemoryStateStore(), metrics=metrics,
    )
    report = controller.tick()
    decision = report.pools[0].decision
    assert (decision.current, decision.desired) == (3, 2), decision.reason
    assert report.pools[0].action is not None and report.pools[0].action.ok
    assert metrics.pool_unplaceable.labels("swarmstuck")._value.get() == 7
    service.reload()
    assert service.attrs["Spec"]["Mode"]["Replicated"]["Replicas"] == 2
    settle(backend, pool, 2)
    assert backend.status(pool).unplaceable == 0


@pytest.mark.redis
def test_a_spec_with_nothing_placeable_is_lowered_to_min_at_once(
    services: Any, backend: SwarmBackend, redis_url: str
) -> None:
    """Trust boundaries III, 11: spec 10, a placement constraint no node meets, an empty queue, min 2. Going from
    0 running to 2 read as a scale-up and waited out the 2-minute start bound (spec 10 at +100 s, 2 at +140 s)
    while the log line said desired=0. The first tick lowers the spec."""
    service = services(
        labels={"autoscaler.pool": "swarmnowhere"}, mode=ServiceMode("replicated", replicas=10),
        constraints=["node.labels.autoscaler-test-no-such-label==1"],
    )
    policy = Policy.model_validate({"interval": 1, "pools": {"swarmnowhere": {
        "target": {"swarm": {"service": service.name}}, "queues": ["nowhere"],
        "min": 2, "max": 10, "tiers": [{"above": 100, "replicas": 10}, {"below": 10, "replicas": 2}],
        "cooldown": {"up": "0s", "down": "0s"}, "stabilization": "0s",
    }}})
    wait_until(lambda: len(service.tasks()) == 10, timeout=60, what="the service's 10 tasks")
    controller = Controller(
        policies=FixedPolicy(policy), source=CeleryRedisSource(url=redis_url, broker=BrokerOptions()),
        backend=backend, store=MemoryStateStore(), metrics=Metrics(),
    )
    report = controller.tick().pools[0]
    assert (report.decision.current, report.decision.desired) == (0, 2), report.decision.reason
    assert report.action is not None and report.action.ok
    service.reload()
    assert service.attrs["Spec"]["Mode"]["Replicated"]["Replicas"] == 2
