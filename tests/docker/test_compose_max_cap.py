"""`max` holds while busy victims drain (Trust boundaries III, 2): the real Compose backend and engine.

Draining containers were left out of the count checked against `max`: max 4, busy victims in their warm
shutdown, the queue depth swinging -> 10 containers up at once. Now they count until they are gone, and a
scale-up they would push past max is a hold that says so. The victims here ignore SIGTERM (slowstop.yaml), as
a worker finishing a long task does.
"""

from __future__ import annotations

import pytest
import redis
from dockertest import publish

from autoscaler.backends.base import BackendError
from autoscaler.backends.compose import ComposeBackend
from autoscaler.backends.compose_model import PRESENT_STATES
from autoscaler.backends.docker_client import DockerConnection
from autoscaler.loop import Controller
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.model import BrokerOptions, Policy
from autoscaler.policy.watch import FixedPolicy
from autoscaler.sources.celery_redis import CeleryRedisSource
from autoscaler.state_store import MemoryStateStore
from autoscaler.types import Direction
from tests.docker.conftest import ProjectFactory

pytestmark = [pytest.mark.docker, pytest.mark.redis]


def test_busy_victims_count_toward_max_while_the_queue_swings(compose_project: ProjectFactory, redis_url: str) -> None:
    project = compose_project("slowstop.yaml", "worker", tag="cap")
    queue = f"{project.name}-q"
    policy = Policy.model_validate({"interval": 1, "pools": {"fast": {
        "target": {"compose": {"service": "worker", "project": project.name}}, "queues": [queue],
        "min": 1, "max": 4, "tiers": [{"above": 100, "replicas": 4}, {"below": 10, "replicas": 1}],
        "cooldown": {"up": "0s", "down": "0s"}, "stabilization": "0s", "stop_timeout": "60s",
    }}})
    backend = ComposeBackend(docker_connection=DockerConnection())
    source = CeleryRedisSource(url=redis_url, broker=BrokerOptions())
    controller = Controller(policies=FixedPolicy(policy), source=source, backend=backend,
                            store=MemoryStateStore(), metrics=Metrics())
    broker = redis.Redis.from_url(redis_url)

    def counted() -> int:
        return sum(1 for c in project.containers("worker") if c.status in PRESENT_STATES)

    def swing(depth: int) -> str:
        broker.delete(queue, *broker.keys(f"{queue}\x06\x16*"))
        if depth:
            publish(redis_url, depth, queue=queue)
        decision = controller.tick().pools[0].decision
        assert counted() <= 4, f"{counted()} containers of a pool whose max is 4: {decision.reason}"
        return decision.reason

    try:
        swing(200)  # 3 -> 4
        assert backend.status(policy.pools[0]).running == 4
        swing(0)  # 4 -> 1: three busy victims, each stopping for up to 60 s
        status = backend.status(policy.pools[0])
        assert (status.running, status.draining) == (1, 3), status.detail
        for depth in (200, 0, 500, 5, 300):
            reason = swing(depth)
            if depth > 100:
                assert "3 draining count toward max 4" in reason, reason
        report = controller.tick().pools[0]
        assert report.decision.direction is Direction.HOLD and report.action is None, "the cap is a hold, not an error"
        # Asked directly (the decision would not ask), the backend itself refuses to pass max.
        with pytest.raises(BackendError, match=r"4 containers exist \(3 draining\), max is 4"):
            backend.scale(policy.pools[0], current=1, desired=4)
        assert counted() == 4
    finally:
        backend.close()
        source.close()
        broker.close()
