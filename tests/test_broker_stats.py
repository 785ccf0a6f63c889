"""The broker stats read (task counts, worker beats, INFO memory) treats everything as hostile input.

Any broker client can write the hashes, and whatever answers on the broker's address writes INFO: nothing
raises, every refusal says what and where, and one bad field or hash costs only itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from autoscaler.celery import TASKS_KEY, WORKERS_KEY, WorkerStats, container_memory
from autoscaler.observability.celery_metrics import WORKER_PURGE_S
from autoscaler.observability.metrics import Metrics, action_kind
from autoscaler.policy.load import parse_policy
from autoscaler.policy.model import BrokerOptions, Policy
from autoscaler.sources.base import BrokerStats, SourceError, WorkerBeat
from autoscaler.sources.broker_stats import MAX_HASH_FIELDS, RedisBrokerStats, parse_info_memory, parse_reply
from autoscaler.types import Decision, PoolState

WHERE = "redis://test:6379/0"
POLICY = """
interval: 5s
pools:
  fast:
    target: {compose: {service: worker-fast}}
    queues: [fast, shared]
    min: 1
    max: 4
    tiers: [{above: 10, replicas: 4}, {below: 1, replicas: 1}]
  cpu:
    target: {compose: {service: worker-cpu}}
    queues: [shared]
    min: 0
    max: 2
    per_replica: {value: 5}
"""


def _policy() -> Policy:
    return parse_policy(POLICY)


field_bytes = st.binary(max_size=300) | st.sampled_from([b"succeeded:t", b"failed:t", b"host"])
value_bytes = st.binary(max_size=60) | st.sampled_from([b"12", b"-1", b"1e3", b"99999999999999999999",
                                                          b"1700000000.5 10 1024 -", b"nan 10 1 1", b"1 0 1 1"])
hash_entry = st.lists(st.tuples(field_bytes, value_bytes), max_size=8).map(
    lambda pairs: [b"ok", *[x for pair in pairs for x in pair]]
) | st.lists(st.one_of(st.binary(max_size=20), st.integers()), min_size=3, max_size=3) | st.integers() | st.none()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(info=st.binary(max_size=400), entries=st.lists(hash_entry, min_size=4, max_size=4))
def test_any_reply_of_the_scripts_shape_parses_and_every_refusal_is_located(info: bytes, entries: list[object]) -> None:
    stats = parse_reply(["fast", "io"], [info, *entries], where=WHERE)
    for queue, kind, sentence in stats.problems:
        assert kind in {"task_counts", "worker_beats", "broker_memory"}
        assert WHERE in sentence
        if queue:
            assert queue in sentence or TASKS_KEY.format(queue=queue) in sentence or "Redis key" in sentence
    for counts in stats.tasks.values():
        assert all(state in {"succeeded", "failed"} and 0 <= n < 10**15 for (state, _), n in counts.items())
    for beats in stats.workers.values():
        assert all(0.1 <= b.every <= 3600 and (b.memory is None or b.memory >= 0) for b in beats.values())


@given(reply=st.one_of(st.none(), st.integers(), st.lists(st.binary(max_size=10), max_size=6)))
def test_a_reply_not_of_the_scripts_shape_is_a_located_source_error(reply: object) -> None:
    if isinstance(reply, list) and len(reply) == 5:
        return  # the script's shape: covered above
    with pytest.raises(SourceError, match="broker stats script at redis://test"):
        parse_reply(["fast", "io"], reply, where=WHERE)


@given(text=st.binary(max_size=2000))
def test_any_info_answer_parses(text: bytes) -> None:
    used, limit, problems = parse_info_memory(text, where=WHERE)
    for value in (used, limit):
        assert value is None or 0 <= value < 10**19
    assert len(problems) == (used is None) + (limit is None)
    assert all(p.startswith(f"INFO memory at {WHERE}: ") for p in problems)


def test_info_memory_reads_used_and_maxmemory_not_their_look_alikes() -> None:
    text = b"# Memory\r\nused_memory_rss:999\r\nused_memory:1000\r\nmaxmemory_policy:noeviction\r\nmaxmemory:4096\r\n"
    assert parse_info_memory(text, where=WHERE) == (1000, 4096, [])
    assert parse_info_memory(b"used_memory:-5\r\n", where=WHERE)[2] == [
        f"INFO memory at {WHERE}: used_memory not a byte count (b'-5')", f"INFO memory at {WHERE}: maxmemory missing"
    ]


@pytest.mark.redis
def test_hostile_hashes_in_a_real_redis_cost_only_themselves(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.hset(TASKS_KEY.format(queue="fast"), mapping={
        "succeeded:tasks.ok": 7, "failed:tasks.ok": 2, "failed:tasks.bad": "-3", "weird:x": 1, "succeeded:": 1,
        "failed:" + "n" * 500: 1, "succeeded:tasks.big": "1" * 40,
    })
    client.hset(WORKERS_KEY.format(queue="fast"), mapping={"w1": "1700000000.5 10 2048 4096", "w2": "soon 10 1 1"})
    client.set(TASKS_KEY.format(queue="io"), "not a hash")
    client.hset(WORKERS_KEY.format(queue="io"), mapping={f"h{i}": "1 10 - -" for i in range(MAX_HASH_FIELDS + 1)})
    client.hset(TASKS_KEY.format(queue="cpu"), "succeeded:big", "9" * (300 << 10))
    stats = RedisBrokerStats(client, where=WHERE).read(["fast", "io", "cpu"], BrokerOptions())
    assert stats.tasks["fast"] == {("succeeded", "tasks.ok"): 7, ("failed", "tasks.ok"): 2}
    assert stats.workers["fast"] == {"w1": WorkerBeat(at=1700000000.5, every=10.0, memory=2048, limit=4096)}
    assert stats.used_memory is not None and stats.used_memory > 0 and stats.maxmemory == 0
    kinds = sorted((q, k) for q, k, _ in stats.problems)
    assert kinds == [("cpu", "task_counts")] + [("fast", "task_counts")] * 5 + [("fast", "worker_beats")] + [
        ("io", "task_counts"), ("io", "worker_beats")]
    sentences = " | ".join(s for _, _, s in stats.problems)
    for located in ("'_autoscaler:tasks:io' at redis://test:6379/0 holds a string, not a hash",
                    f"has {MAX_HASH_FIELDS + 1} fields, above", "'_autoscaler:tasks:cpu'", "b'failed:tasks.bad'",
                    "b'weird:x'", "b'w2'"):
        assert located in sentences


def _stats(**workers: WorkerBeat) -> BrokerStats:
    return BrokerStats(used_memory=10, maxmemory=100, tasks={"fast": {("failed", "t"): 5}},
                       workers={"shared": dict(workers)})


def _text(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_only_the_leader_serves_the_broker_series_and_counts_come_as_they_stand() -> None:
    metrics = Metrics()
    metrics.broker.update(_stats(), _policy(), now=1000.0)
    assert "celery_task_failed_total" not in _text(metrics)  # a standby's copy would be stale
    metrics.set_leader(True)
    assert 'celery_task_failed_total{name="t",queue_name="fast"} 5.0' in _text(metrics)
    # The hash deleted and counted again: a lower value is a counter reset, which rate() handles.
    metrics.broker.update(BrokerStats(tasks={"fast": {("failed", "t"): 1}}), _policy(), now=1001.0)
    assert 'celery_task_failed_total{name="t",queue_name="fast"} 1.0' in _text(metrics)
    metrics.broker.forget_stats("broker stats read failed")
    assert "celery_task_failed_total" not in _text(metrics)


def test_worker_up_down_purged_and_memory_per_pool() -> None:
    metrics = Metrics()
    metrics.set_leader(True)
    beats = {
        "fresh": WorkerBeat(at=995.0, every=10.0, memory=2 << 30, limit=None),
        "late": WorkerBeat(at=900.0, every=10.0, memory=1, limit=2),
        "gone": WorkerBeat(at=1000.0 - WORKER_PURGE_S - 31, every=10.0, memory=1, limit=2),
        "ahead": WorkerBeat(at=1000.0 + 3600, every=10.0, memory=1, limit=2),
    }
    metrics.broker.update(_stats(**beats), _policy(), now=1000.0)
    text = _text(metrics)
    assert 'celery_worker_up{hostname="fresh"} 1.0' in text and 'celery_worker_up{hostname="late"} 0.0' in text
    assert 'hostname="gone"' not in text and 'hostname="ahead"' not in text
    # "shared" is consumed by both pools: the worker's memory is shown in each.
    assert 'autoscaler_worker_memory_bytes{hostname="fresh",pool="cpu"} 2.147483648e+09' in text
    assert 'autoscaler_worker_memory_bytes{hostname="fresh",pool="fast"} 2.147483648e+09' in text
    assert 'autoscaler_worker_memory_limit_bytes{hostname="fresh"' not in text  # no limit: no series
    assert 'autoscaler_worker_memory_bytes{hostname="late"' not in text  # a worker that is down: no memory


def test_policy_gauges_follow_a_reload() -> None:
    metrics = Metrics()
    metrics.observe_policy(_policy(), 5.0)
    text = _text(metrics)
    assert 'autoscaler_pool_queue_info{pool="cpu",queue="shared"} 1.0' in text
    assert "autoscaler_policy_interval_seconds 5.0" in text
    metrics.observe_policy(parse_policy(POLICY.split("  cpu:", maxsplit=1)[0]), 7.0)
    text = _text(metrics)
    assert 'pool="cpu"' not in text and "autoscaler_policy_interval_seconds 7.0" in text


def test_the_last_action_keeps_one_series_per_pool_with_a_bounded_kind() -> None:
    metrics = Metrics()
    fast = _policy().pools[0]
    up = Decision("fast", 1, 4, "12 > 10: tier of 4", PoolState())
    metrics.observe_action(fast, up, "ok", 100.0)
    metrics.observe_action(fast, Decision("fast", 4, 1, "0 < 1: tier of 1", PoolState()), "dry_run", 200.0)
    text = _text(metrics)
    assert text.count("autoscaler_pool_last_action_timestamp_seconds{") == 1
    assert ('autoscaler_pool_last_action_timestamp_seconds{direction="down",kind="tiers",pool="fast",'
            'result="dry_run"} 200.0') in text
    assert action_kind(fast, Decision("fast", 0, 1, "0 is below min 1", PoolState())) == "below_min"
    assert action_kind(fast, Decision("fast", 6, 4, "6 is above max 4", PoolState())) == "above_max"
    assert action_kind(fast, Decision("fast", 2, 1, "metric unavailable for 3 ticks (x): fallback to 1",
                                      PoolState())) == "fallback"
    assert action_kind(fast, Decision("fast", 2, 4, "x", PoolState(), details={"repair": True})) == "restore"
    assert action_kind(_policy().pools[1], Decision("cpu", 1, 2, "10 / 5", PoolState())) == "per_replica"


def test_container_memory_reads_cgroup_v2_then_v1(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("0::/\n")
    (tmp_path / "memory.current").write_text("12345\n")
    (tmp_path / "memory.max").write_text("max\n")
    assert container_memory(tmp_path, proc) == (12345, None)
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.stat").write_text("anon 10000\ninactive_file 2345\nactive_file 1\n")
    assert container_memory(tmp_path, proc) == (10000, 1 << 30)  # the working set: page cache left out
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.usage_in_bytes").write_text("777\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert container_memory(v1, tmp_path / "absent") == (777, None)
    assert container_memory(tmp_path / "nothing", tmp_path / "absent") == (None, None)


@pytest.mark.redis
def test_a_starting_worker_prunes_heartbeats_of_workers_that_died(redis_url: str) -> None:
    from celery import Celery  # noqa: PLC0415

    client = redis.Redis.from_url(redis_url)
    key = WORKERS_KEY.format(queue="fast")
    client.hset(key, mapping={"dead": "1000 10 1 1", "junk": "???", "alive": "99999 10 1 1"})
    stats = WorkerStats(Celery("t20prune", broker=redis_url, set_as_current=False), hostname="me")
    stats.prune(["fast"], now=100_000.0)
    stats.beat(["fast"], now=100_000.0)
    assert sorted(client.hkeys(key)) == [b"alive", b"me"]
    stats.forget(["fast"])
    assert sorted(client.hkeys(key)) == [b"alive"]
    # A broker that cannot be reached never fails the task that was counting.
    down = WorkerStats(Celery("t20down", broker="redis://127.0.0.1:1/0", set_as_current=False))
    down.count("fast", "succeeded", "t")
    assert down.errors == 1
