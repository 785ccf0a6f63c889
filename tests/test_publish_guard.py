"""The publish guard: publishing stops below the broker's maxmemory, where kombu would lose messages.

Against a real redis-server: the refusal follows the broker's own INFO memory as its maxmemory is set
around what it uses; a broker without maxmemory is never refused (said once); an unreachable one is not
refused here (the publish fails by itself). And whatever INFO answers (the broker is writable by every
container), the guard never raises.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from autoscaler.publish_guard import PublishGuard, memory_refusal
from tests.test_loop import Clock

pytestmark = pytest.mark.redis


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.config_set("maxmemory", 0)
    client.close()


def _used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def test_publishing_stops_at_the_limit_and_resumes_below_it(broker: redis.Redis, logs: list[str]) -> None:
    clock = Clock(0.0)
    guard = PublishGuard(broker, limit=0.8, ttl=1.0, clock=clock)
    broker.config_set("maxmemory", _used(broker) * 4)  # 25 %: well below the limit
    assert guard.refusal() is None
    broker.config_set("maxmemory", int(_used(broker) * 1.1))  # ~91 %: above it
    assert guard.refusal() is None, "answered again within the ttl: one INFO per second, not per publish"
    clock.now += 1.0
    reason = guard.refusal()
    assert reason is not None and "nearly full" in reason and "80%" in reason and "MiB" in reason
    broker.config_set("maxmemory", _used(broker) * 4)
    clock.now += 1.0
    assert guard.refusal() is None
    assert not [line for line in logs if "no maxmemory" in line]


def test_a_broker_without_maxmemory_is_never_refused_and_the_log_says_so_once(
    broker: redis.Redis, logs: list[str]
) -> None:
    clock = Clock(0.0)
    guard = PublishGuard(broker, clock=clock)
    broker.config_set("maxmemory", 0)
    for _ in range(3):
        assert guard.refusal() is None
        clock.now += 2
    assert len([line for line in logs if "the broker has no maxmemory" in line]) == 1


def test_an_unreachable_broker_is_not_refused_here_and_the_log_says_so_once(logs: list[str]) -> None:
    client = redis.Redis(host="127.0.0.1", port=9, socket_connect_timeout=0.5)
    clock = Clock(0.0)
    guard = PublishGuard(client, clock=clock)
    for _ in range(3):
        assert guard.refusal() is None
        clock.now += 2
    assert len([line for line in logs if "publishing is not guarded until it can" in line]) == 1


@pytest.mark.parametrize("limit", [0, -0.1, 1.5, math.nan])
def test_a_limit_outside_0_1_is_refused(limit: float) -> None:
    with pytest.raises(ValueError, match="fraction of maxmemory"):
        PublishGuard(redis.Redis(), limit=limit)


_value = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@given(
    info=st.one_of(_value, st.fixed_dictionaries({}, optional={"used_memory": _value, "maxmemory": _value})),
    limit=st.floats(min_value=0.01, max_value=1.0),
)
def test_any_info_answer_gives_an_answer_never_an_exception(info: object, limit: float) -> None:
    reason, limited = memory_refusal(info, limit)
    assert reason is None or (limited and "nearly full" in reason)


def test_the_numbers_decide() -> None:
    assert memory_refusal({"used_memory": 79, "maxmemory": 100}, 0.8) == (None, True)
    assert memory_refusal({"used_memory": 80, "maxmemory": 100}, 0.8)[0] is not None
    assert memory_refusal({"used_memory": "900", "maxmemory": "1000"}, 0.8)[0] is not None
    assert memory_refusal({"used_memory": 10**12, "maxmemory": 0}, 0.8) == (None, False)
