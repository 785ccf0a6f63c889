"""Bench: what one whole reconcile tick costs (lock, metric read, decisions, state write), on a real Redis.

Run from the repository root::

    .venv/bin/python bench/tick_cost.py [--ticks 200]

Scenarios: 3 pools of 1 queue each (the stack), and 1,000 queues (100 pools of 10 queues). The backend is
the in-memory one, so the numbers are the controller's own cost; log lines go through the JSON sink to
/dev/null so formatting is paid for. Round trips are counted on the client connections (a pipeline or a
script is one). Targets from the issue: the metric read is 1 round trip; controller CPU <= 5 ms for 3
pools and <= 50 ms for 1,000 queues per tick.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis
from loguru import logger
from source_cost import CountingConnection, redis_server

from autoscaler.backends.memory import MemoryBackend
from autoscaler.leader import LeaderLock
from autoscaler.loop import Controller
from autoscaler.observability.logs import json_sink
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.load import parse_policy
from autoscaler.policy.model import Policy
from autoscaler.policy.watch import FixedPolicy
from autoscaler.sources.celery_redis import CeleryRedisSource
from autoscaler.state_store import RedisStateStore

__all__ = ["main"]

CPU_TARGETS_MS = {"3 pools": 5.0, "1,000 queues": 50.0}


def policy_text(pools: int, queues_per_pool: int) -> str:
    lines = ["interval: 15s", "pools:"]
    for p in range(pools):
        queues = ", ".join(f"q{p}_{i}" for i in range(queues_per_pool))
        lines += [
            f"  pool{p}:",
            f"    target: {{compose: {{service: worker{p}}}}}",
            f"    queues: [{queues}]",
            "    min: 2",
            "    max: 10",
            "    tiers:",
            "      - {above: 500, replicas: 10}",
            "      - {above: 100, replicas: 5}",
            "      - {below: 10, replicas: 2}",
        ]
    return "\n".join(lines) + "\n"


def fill(client: redis.Redis, policy: Policy) -> None:
    pipe = client.pipeline(transaction=False)
    for i, queue in enumerate(policy.queues):
        # A few raw kombu-shaped messages per queue: enough for LLEN and LINDEX to do real work.
        body = '{"body": "e30=", "headers": {"x-autoscaler-published-at": %f}, "properties": {}}' % (
            time.time() - i % 60
        )
        pipe.lpush(queue, *([body] * (1 + i % 5)))
    pipe.execute()


def measure(url: str, name: str, pools: int, queues_per_pool: int, ticks: int) -> dict[str, float | str]:
    policy = parse_policy(policy_text(pools, queues_per_pool), source=name)
    pool = redis.ConnectionPool.from_url(url, connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    client.flushall()
    fill(client, policy)
    controller = Controller(
        policies=FixedPolicy(policy),
        source=CeleryRedisSource(url=url, client=client, broker=policy.broker),
        backend=MemoryBackend({f"worker{p}": 2 for p in range(pools)}),
        store=RedisStateStore(client),
        metrics=Metrics(),
        lock=LeaderLock(client, key="autoscaler:leader", instance_id="bench", ttl=30),
        dry_run=True,
    )
    controller.tick()  # warm-up: script load, state read
    cpu, wall, trips = [], [], []
    for _ in range(ticks):
        sent, c0, w0 = CountingConnection.sent, time.process_time(), time.perf_counter()
        report = controller.tick()
        cpu.append((time.process_time() - c0) * 1000)
        wall.append((time.perf_counter() - w0) * 1000)
        trips.append(CountingConnection.sent - sent)
        assert report.role == "leader" and report.metric_error is None
    return {
        "scenario": name,
        "pools": pools,
        "queues": len(policy.queues),
        "round_trips": statistics.mean(trips),
        "cpu_ms": statistics.mean(cpu),
        "cpu_p95_ms": sorted(cpu)[int(0.95 * (len(cpu) - 1))],
        "wall_ms": statistics.mean(wall),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=200)
    args = parser.parse_args()
    logger.remove()
    with open("/dev/null", "w") as devnull:
        logger.add(json_sink(devnull), level="INFO")
        with redis_server() as url:
            rows = [
                measure(url, "3 pools", 3, 1, args.ticks),
                measure(url, "1,000 queues", 100, 10, max(20, args.ticks // 10)),
            ]
    print(f"{'scenario':<14} {'pools':>5} {'queues':>6} {'round trips':>11} {'CPU ms':>7} {'CPU p95':>7} "
          f"{'wall ms':>7}  CPU target")
    for r in rows:
        target = CPU_TARGETS_MS[str(r["scenario"])]
        verdict = "ok" if float(r["cpu_ms"]) <= target else "MISSED"
        print(f"{r['scenario']:<14} {r['pools']:>5} {r['queues']:>6} {r['round_trips']:>11.1f} "
              f"{r['cpu_ms']:>7.2f} {r['cpu_p95_ms']:>7.2f} {r['wall_ms']:>7.2f}  <= {target:g} {verdict}")
    print("round trips per tick = 1 leader-lock renewal + 1 metric read (all queues) + 1 state write")


if __name__ == "__main__":
    main()
