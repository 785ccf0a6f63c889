"""Bench: what the queue watch (sources/queue_watch.py) costs Redis and the controller, against a real
redis-server it starts itself.

Run from the repository root::

    .venv/bin/python bench/watch_cost.py [--seconds 10]

Scenarios: the shipped 3 pools while a separate process publishes 1,000 messages a second (LPUSH of a 1 KB
Celery-like body, what kombu's publish does to Redis); and 1,000 pools of one queue each (4 list keys a queue
with kombu's default priority steps) with no traffic. Each runs once with the watch probing every 250 ms and
once without (the baseline), for the same window, and prints per second: Redis CPU (INFO cpu, user + sys),
commands processed, the probe's EVALSHA calls and its server time per call (INFO commandstats), and the
controller process's CPU (time.process_time: the watcher thread; the publisher is another process).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from autoscaler.sources.queue_watch import QueueWatcher, WatchPlan, WatchTarget
from bench.source_cost import redis_server

PUBLISHER = """
import sys, time, redis
client = redis.Redis.from_url(sys.argv[1])
rate, body = int(sys.argv[2]), b"x" * 1024
queues = sys.argv[3].split(",")
start, sent = time.monotonic(), 0
while True:
    due = int((time.monotonic() - start) * rate)
    if due > sent:
        pipe = client.pipeline(transaction=False)
        for n in range(sent, due):
            pipe.lpush(queues[n % len(queues)], body)
        pipe.execute()
        sent = due
    time.sleep(0.005)
"""


def redis_counters(client: redis.Redis) -> dict[str, float]:
    cpu: Any = client.info("cpu")
    stats: Any = client.info("stats")
    commands: Any = client.info("commandstats")
    evalsha = commands.get("cmdstat_evalsha", {})
    return {
        "cpu": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        "commands": float(stats["total_commands_processed"]),
        "evalsha": float(evalsha.get("calls", 0)),
        "evalsha_usec": float(evalsha.get("usec", 0)),
    }


def measure(url: str, plan: WatchPlan | None, seconds: float) -> dict[str, float]:
    client = redis.Redis.from_url(url)
    watcher = None
    if plan is not None:
        watcher = QueueWatcher(client, plan=lambda: plan, on_wake=lambda _pool: None)
    before, cpu0, t0 = redis_counters(client), time.process_time(), time.monotonic()
    if watcher is not None:
        watcher.start()
    time.sleep(seconds)
    if watcher is not None:
        watcher.stop()
    after, cpu1, t1 = redis_counters(client), time.process_time(), time.monotonic()
    span = t1 - t0
    calls = after["evalsha"] - before["evalsha"]
    return {
        "redis_cpu_pct": 100 * (after["cpu"] - before["cpu"]) / span,
        "commands_per_s": (after["commands"] - before["commands"]) / span,
        "probes_per_s": calls / span,
        "probe_usec": (after["evalsha_usec"] - before["evalsha_usec"]) / calls if calls else 0.0,
        "controller_cpu_pct": 100 * (cpu1 - cpu0) / span,
    }


def scenario(name: str, pools: dict[str, WatchTarget], rate: int, seconds: float) -> None:
    with redis_server() as url:
        queues = sorted({q for t in pools.values() for q in t.queues})
        publisher = None
        if rate:
            publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER, url, str(rate), ",".join(queues)])
            time.sleep(1.0)  # let it reach its rate
        try:
            plan = WatchPlan(interval=15.0, pools=pools)
            off = measure(url, None, seconds)
            on = measure(url, plan, seconds)
        finally:
            if publisher is not None:
                publisher.terminate()
                publisher.wait(timeout=10)
    print(f"{name}:")
    for label, row in (("watch off", off), ("watch on", on)):
        print(f"  {label:9}  " + "  ".join(f"{k} {v:,.2f}" for k, v in row.items()))
    print("  the watch's share: " + json.dumps({
        "redis_cpu_pct": round(on["redis_cpu_pct"] - off["redis_cpu_pct"], 2),
        "commands_per_s": round(on["commands_per_s"] - off["commands_per_s"], 1),
        "controller_cpu_pct": round(on["controller_cpu_pct"] - off["controller_cpu_pct"], 2),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring window per run")
    args = parser.parse_args()
    never = 10**12  # no wake: the probe's own cost is measured
    shipped = {name: WatchTarget((queue,), never, 0) for name, queue in
               (("fast", "fast"), ("cpu", "cpu_intensive"), ("io", "io_intensive"))}
    scenario("3 pools, 1,000 msgs/s published", shipped, 1000, args.seconds)
    many = {f"pool{n}": WatchTarget((f"queue{n}",), never, 0) for n in range(1000)}
    scenario("1,000 pools of one queue, idle", many, 0, args.seconds)
    scenario("1,000 pools of one queue, 1,000 msgs/s published", many, 1000, args.seconds)


if __name__ == "__main__":
    main()
