"""The queue read against keys any broker client can write: wrong types stay local, big data is not copied.

Issue 17, items 4 and 5: one key of the wrong type used to abort the whole Lua read (every pool held), and
the read copied the oldest message of every list and every unacked field name whole, however big.
Real redis-server (tests/conftest.py); what the script touched is read from INFO commandstats (commands
called inside a script are counted there) and from the bytes the script says it copied.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoscaler.celery import PUBLISHED_AT_HEADER
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.decide import metric_value
from autoscaler.policy.model import DEFAULT_SEPARATOR, BrokerOptions, PoolPolicy
from autoscaler.sources.celery_redis import CeleryRedisSource
from autoscaler.types import Observation, QueueStats
from tests.conftest import RedisServer

NOW = 2_000_000_000.0
SEP = DEFAULT_SEPARATOR


@pytest.fixture
def source(redis_url: str) -> Iterator[Callable[..., CeleryRedisSource]]:
    made: list[CeleryRedisSource] = []

    def factory(**options: Any) -> CeleryRedisSource:
        made.append(CeleryRedisSource(url=redis_url, broker=BrokerOptions(**options), clock=lambda: NOW))
        return made[-1]

    yield factory
    for src in made:
        src.close()


def message(age: float, padding: int = 0) -> str:
    """A kombu-shaped list message stamped `age` seconds before NOW, its body padded to `padding` bytes."""
    return json.dumps({"body": "x" * padding, "headers": {PUBLISHED_AT_HEADER: NOW - age}, "properties": {}})


def unacked_entry(queue: str, padding: int = 0) -> str:
    return json.dumps([{"body": "x" * padding, "headers": {}}, "", queue])


def pool(queue: str, metric: str = "waiting") -> PoolPolicy:
    return PoolPolicy.model_validate(
        {
            "name": "p",
            "target": {"compose": {"service": "w"}},
            "queues": [queue],
            "min": 0,
            "max": 10,
            "metric": metric,
            "per_replica": {"value": 10},
        }
    )


def metric(stats: dict[str, QueueStats], queue: str, kind: str = "waiting") -> tuple[float | None, str]:
    return metric_value(pool(queue, kind), Observation(queues=(stats[queue],), current=1))


def commands_run(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT (script calls included), by lower-case name."""
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in client.info("commandstats").items()}


# --- item 4: a wrong-typed key is located and confined ---------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize(
    ("key", "setup", "kind"),
    [
        (f"work{SEP}9", lambda c, k: c.set(k, "x"), "string"),  # the issue's `SET fast\x06\x169 x`
        ("work", lambda c, k: c.hset(k, "f", "v"), "hash"),
        (f"work{SEP}3", lambda c, k: c.sadd(k, "m"), "set"),
        ("work", lambda c, k: c.xadd(k, {"f": "v"}), "stream"),
    ],
)
def test_a_wrong_typed_list_key_makes_only_its_own_queue_unreadable(
    redis_server: RedisServer,
    source: Callable[..., CeleryRedisSource],
    key: str,
    setup: Callable[[redis.Redis, str], Any],
    kind: str,
) -> None:
    client = redis_server.client()
    client.lpush("other", message(30), message(20), message(10))
    if key != "work":
        client.lpush("work", message(5))
    setup(client, key)

    stats = source().observe(["work", "other"])  # raised SourceError for every queue before

    error = stats["work"].error
    assert error is not None
    assert repr(key) in error and f"holds a {kind}, not a list" in error and "queue 'work'" in error
    value, why = metric(stats, "work")
    assert value is None and repr(key) in why  # the pool on `work` holds, and says which key
    assert stats["other"].error is None
    assert (stats["other"].waiting, stats["other"].latency_s) == (3, 30.0)
    assert metric(stats, "other") == (3.0, "")  # the other pool decides as usual


@pytest.mark.redis
@pytest.mark.parametrize("setup", [lambda c: c.rpush("unacked", "x"), lambda c: c.set("unacked", "x")])
def test_a_wrong_typed_unacked_key_makes_only_unacked_unknown(
    redis_server: RedisServer, source: Callable[..., CeleryRedisSource], setup: Callable[[redis.Redis], Any]
) -> None:
    client = redis_server.client()
    client.lpush("work", message(7), message(3))
    setup(client)

    stats = source().observe(["work"])

    work = stats["work"]
    assert work.error is None and (work.waiting, work.latency_s) == (2, 7.0)
    assert work.unacked_error is not None and "'unacked'" in work.unacked_error
    assert "unacked_key" in work.unacked_error
    value, why = metric(stats, "work", "waiting_unacked")
    assert value is None and "'unacked'" in why  # pools on waiting_unacked hold
    assert metric(stats, "work", "waiting") == (2.0, "")  # pools on waiting and latency do not
    assert metric(stats, "work", "latency") == (7.0, "")


@pytest.mark.redis
def test_a_wrong_typed_unacked_index_is_not_read(
    redis_server: RedisServer, source: Callable[..., CeleryRedisSource]
) -> None:
    """kombu's unacked_index (a sorted set) is not something the read needs: its type changes nothing."""
    client = redis_server.client()
    client.lpush("work", message(4))
    client.set("unacked_index", "x")
    client.hset("unacked", "tag-1", unacked_entry("work"))
    work = source().observe(["work"])["work"]
    assert (work.waiting, work.unacked, work.error, work.unacked_error) == (1, 1, None, None)


def test_queue_read_problems_are_counted_per_queue_and_kind() -> None:
    metrics = Metrics()
    metrics.observe_queues(
        [
            QueueStats("bad", 0, 0, None, error="key 'bad' holds a hash", unacked_error="x"),
            QueueStats("big", 5, 0, None, latency_error="oldest message too large to read"),
            QueueStats("fine", 3),
        ]
    )
    value = metrics.registry.get_sample_value
    assert value("autoscaler_queue_read_problems_total", {"queue": "bad", "problem": "unreadable"}) == 1
    assert value("autoscaler_queue_read_problems_total", {"queue": "bad", "problem": "unacked_unknown"}) == 1
    assert value("autoscaler_queue_read_problems_total", {"queue": "big", "problem": "latency_unknown"}) == 1
    assert value("autoscaler_queue_read_problems_total", {"queue": "fine", "problem": "unreadable"}) is None
    assert value("autoscaler_queue_waiting", {"queue": "big"}) == 5
    assert value("autoscaler_queue_waiting", {"queue": "bad"}) != value("autoscaler_queue_waiting", {"queue": "bad"})


# --- item 5: what the read copies is bounded -------------------------------------------------------------


@pytest.mark.redis
def test_an_oldest_message_too_large_to_read_is_not_copied(
    redis_server: RedisServer, source: Callable[..., CeleryRedisSource]
) -> None:
    """A 3 MB oldest message (above 1 MiB in all and 64 KiB a message on average) is not LINDEXed: latency
    of that queue is unknown and says why; its waiting count and every other queue are read as usual."""
    client = redis_server.client()
    client.lpush("big", message(60, padding=3_000_000))
    client.lpush("big", *[message(age) for age in range(20, 0, -1)])  # newer, small: the big one is oldest
    client.lpush("small", message(9), message(2))
    client.config_resetstat()

    src = source()
    stats = src.observe(["big", "small"])

    big = stats["big"]
    assert (big.waiting, big.latency_s, big.error) == (21, None, None)
    assert big.latency_error is not None and "oldest message too large to read" in big.latency_error
    assert "'big'" in big.latency_error
    value, why = metric(stats, "big", "latency")
    assert value is None and "too large" in why
    assert metric(stats, "big") == (21.0, "")  # waiting is still known
    assert stats["small"].latency_s == 9.0
    assert commands_run(client).get("lindex") == 1  # the small queue's only: the 3 MB one was not copied
    assert src.last_copied_bytes < 10_000


@pytest.mark.redis
def test_unacked_field_names_are_not_copied_beyond_the_budget(
    redis_server: RedisServer, source: Callable[..., CeleryRedisSource]
) -> None:
    """300 unacked entries with 100 KB field names (30 MB of names): HKEYS used to copy them all every tick.
    Now names are sampled within the byte budget and the count is estimated from what was read."""
    client = redis_server.client()
    entry = unacked_entry("alpha")
    pipe = client.pipeline(transaction=False)
    for i in range(300):
        pipe.hset("unacked", f"{i:06d}" + "n" * 100_000, entry)
    pipe.execute()
    client.config_resetstat()

    src = source(unacked_bytes=1 << 20)
    alpha = src.observe(["alpha"])["alpha"]

    assert "hkeys" not in commands_run(client)
    assert src.last_copied_bytes <= 1 << 20
    assert alpha.unacked == 300 and alpha.unacked_error is None  # every entry read was alpha's


@pytest.mark.redis
def test_small_unacked_hash_is_still_read_exactly(
    redis_server: RedisServer, source: Callable[..., CeleryRedisSource]
) -> None:
    client = redis_server.client()
    client.hset("unacked", mapping={f"tag-{i}": unacked_entry("alpha" if i % 3 else "beta") for i in range(90)})
    stats = source().observe(["alpha", "beta"])
    assert (stats["alpha"].unacked, stats["beta"].unacked) == (60, 30)


# --- property: any key types and contents -> no raise, every problem located -----------------------------

QUEUES = ("work", 'we"ird\\')
STEPS = (0, 3, 6, 9)
BLOBS = st.binary(max_size=64)
KINDS = ("absent", "list", "string", "hash", "set", "zset", "stream")


def _keys() -> list[str]:
    lists = [q if s == 0 else f"{q}{SEP}{s}" for q in QUEUES for s in STEPS]
    return [*lists, "unacked", "unacked_index"]


def _write(client: redis.Redis, key: str, kind: str, blobs: list[bytes]) -> None:
    items = blobs or [b""]
    if kind == "list":
        client.rpush(key, *items)
    elif kind == "string":
        client.set(key, items[0])
    elif kind == "hash":
        client.hset(key, mapping={b"f%d" % i: v for i, v in enumerate(items)})
    elif kind == "set":
        client.sadd(key, *items)
    elif kind == "zset":
        client.zadd(key, {v: i for i, v in enumerate(items)})
    elif kind == "stream":
        client.xadd(key, {b"f": items[0]})


@pytest.mark.redis
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=st.lists(st.tuples(st.sampled_from(KINDS), st.lists(BLOBS, max_size=4)), min_size=10, max_size=10))
def test_any_key_types_never_raise_and_every_problem_is_located(
    redis_url: str, layout: list[tuple[str, list[bytes]]]
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    written = dict(zip(_keys(), layout, strict=True))
    for key, (kind, blobs) in written.items():
        _write(client, key, kind, blobs)
    src = CeleryRedisSource(client=client, broker=BrokerOptions(), clock=lambda: NOW)
    stats = src.observe(list(QUEUES))
    for queue in QUEUES:
        keys = [queue if s == 0 else f"{queue}{SEP}{s}" for s in STEPS]
        wrong = [k for k in keys if written[k][0] not in ("absent", "list")]
        q = stats[queue]
        if wrong:
            assert q.error is not None and f"queue {queue!r}" in q.error
            assert any(repr(k) in q.error and f"holds a {written[k][0]}" in q.error for k in wrong)
            value, why = metric_value(pool(queue), Observation((q,), current=1))
            assert value is None and why == q.error  # the pools on this queue hold, saying which key
        else:
            assert q.error is None
            assert q.waiting == sum(len(written[k][1] or [b""]) for k in keys if written[k][0] == "list")
        unacked_kind = written["unacked"][0]
        if unacked_kind not in ("absent", "hash"):
            assert q.unacked_error is not None and "'unacked'" in q.unacked_error
            assert f"holds a {unacked_kind}" in q.unacked_error
        else:
            assert q.unacked_error is None
    client.close()
