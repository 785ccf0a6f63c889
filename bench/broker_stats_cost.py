"""Bench: what the per-tick broker stats read and the workers' per-task counter cost, on a real redis-server.

Run from the repository root::

    .venv/bin/python bench/broker_stats_cost.py [--calls 200]

Scenarios: the shipped stack's 3 queues with 20 task names each and 10 workers each (typical); 3 queues at
the read's bounds (1,024 fields of task counts and of heartbeats each: what a hostile writer can make the
read copy). Per read: wall time, controller CPU time, and Redis server time (INFO commandstats
usec_per_call of EVALSHA). Per finished task: the wall time of the worker helper's HINCRBY.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
from celery import Celery

from autoscaler.celery import TASKS_KEY, WORKERS_KEY, WorkerStats
from autoscaler.policy.model import BrokerOptions
from autoscaler.sources.broker_stats import MAX_HASH_FIELDS, RedisBrokerStats

QUEUES = ["fast", "cpu_intensive", "io_intensive"]


def _redis(workdir: str) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    binary = shutil.which("redis-server") or sys.exit("redis-server is not installed")
    proc = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            redis.Redis(port=port).ping()
        except redis.ConnectionError:
            time.sleep(0.05)
        else:
            return proc, port
    sys.exit("redis-server did not start")


def _fill(client: redis.Redis, names: int, workers: int) -> None:
    client.flushall()
    for q in QUEUES:
        client.hset(TASKS_KEY.format(queue=q), mapping={f"{s}:tasks.name_{i:04d}": 123456 for i in range(names)
                                                        for s in ("succeeded", "failed")})
        client.hset(WORKERS_KEY.format(queue=q), mapping={f"worker-{i:04d}-abcdef": "1764800000.123 10 123456789 -"
                                                          for i in range(workers)})


def _read(client: redis.Redis, calls: int) -> tuple[float, float, float]:
    reader = RedisBrokerStats(client, where="bench")
    reader.read(QUEUES, BrokerOptions())
    client.config_resetstat()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        reader.read(QUEUES, BrokerOptions())
    wall, cpu = (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls
    stats = client.info("commandstats")
    server = float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", 0.0))
    return wall * 1000, cpu * 1000, server / 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        proc, port = _redis(workdir)
        try:
            client = redis.Redis(port=port)
            print(f"{'scenario':<48} {'wall ms':>8} {'CPU ms':>8} {'Redis ms':>9}")
            for label, names, workers in (("3 queues, 20 task names, 10 workers each", 20, 10),
                                          (f"3 queues at the bounds ({MAX_HASH_FIELDS} fields each)",
                                           MAX_HASH_FIELDS // 2, MAX_HASH_FIELDS)):
                _fill(client, names, workers)
                wall, cpu, server = _read(client, args.calls)
                print(f"{label:<48} {wall:8.2f} {cpu:8.2f} {server:9.3f}")
            stats = WorkerStats(Celery("bench", broker=f"redis://127.0.0.1:{port}/0", set_as_current=False))
            n = args.calls * 10
            started = time.perf_counter()
            for i in range(n):
                stats.count("fast", "succeeded", f"tasks.name_{i % 20}")
            per_task = (time.perf_counter() - started) / n * 1e6
            print(f"worker helper: one HINCRBY per finished task: {per_task:.0f} us wall ({n} tasks, errors "
                  f"{stats.errors})")
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
