"""Bench: what one `CeleryRedisSource.observe()` costs, against a real redis-server it starts itself.

Run from the repository root::

    .venv/bin/python bench/source_cost.py [--calls 200]

Scenarios: 3 queues with a few thousand Celery messages across priorities plus a few hundred unacked
(held by a real kombu consumer); 1,000 queues; 3 queues with a 100k-entry unacked hash (sampled); and 3
queues with 2,000 unacked messages of 100 KB, read with the default byte budget (1 MiB) and, for the side
by side, with a budget that reads them all (what every read did before the budget).
Per call it reports Redis round trips (counted on the client connection), controller CPU time
(`time.process_time`), wall time, and Redis server time (INFO commandstats usec_per_call of EVALSHA).
Targets: 1 round trip; <= 5 ms CPU for 3 pools; <= 50 ms CPU for 1,000 queues.
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Runs from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
from celery import Celery
from kombu import Consumer, Queue

import autoscaler.celery
from autoscaler.policy.model import BrokerOptions
from autoscaler.sources.celery_redis import CeleryRedisSource

__all__ = ["main"]

POOL_QUEUES = {"fast": 3000, "io_intensive": 2000, "default": 1000}
UNACKED_HELD = 300
MANY_QUEUES = 1000
MESSAGES_PER_MANY_QUEUE = 3
HUGE_UNACKED = 100_000
# Trust boundaries I, defect 8: big messages in the unacked hash (whole messages are its values).
BIG_UNACKED, BIG_UNACKED_BYTES = 2000, 100_000
CPU_TARGET_POOLS_MS = 5.0
CPU_TARGET_MANY_MS = 50.0


class CountingConnection(redis.Connection):
    """Counts requests sent: one per round trip (a pipeline is one too)."""

    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sent += 1
        super().send_packed_command(command, check_health)


@dataclass
class Row:
    scenario: str
    queues: int
    round_trips: float
    cpu_ms: float
    wall_ms: float
    wall_p99_ms: float
    server_ms: float
    target_cpu_ms: float | None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server on a free port in a temp dir; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_ready(port)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def wait_ready(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            redis.Redis(port=port, socket_timeout=0.5).ping()
        except redis.ConnectionError:
            time.sleep(0.05)
        else:
            return
    sys.exit(f"redis-server did not start on port {port}")


def publish(app: Celery, counts: dict[str, int]) -> None:
    """Real Celery task messages, random priorities 0..9, stamped by autoscaler.celery."""
    rng = random.Random(7)
    with app.producer_or_acquire() as producer:
        for queue, count in counts.items():
            for _ in range(count):
                app.send_task(
                    "bench.noop", args=("x" * 64,), queue=queue, priority=rng.randint(0, 9), producer=producer
                )


def hold_unacked(conn: Any, queues: list[str], count: int) -> None:
    """A real kombu consumer receives `count` messages and never acks them."""
    received: list[Any] = []
    consumer = Consumer(
        conn,
        queues=[Queue(q) for q in queues],
        no_ack=False,
        prefetch_count=count + 10,
        callbacks=[lambda _body, message: received.append(message)],
    )
    consumer.consume()
    while len(received) < count:
        conn.drain_events(timeout=5)


def fill_huge_unacked(client: redis.Redis, total: int) -> None:
    """Copy one real unacked entry `total` times (server-side, so filling stays quick)."""
    template = next(iter(client.hvals("unacked")))
    fill = client.register_script(
        "for i = 1, tonumber(ARGV[1]) do redis.call('HSET', KEYS[1], 'bench-' .. i, ARGV[2]) end"
    )
    fill(keys=["unacked"], args=[total, template])


def fill_big_unacked(client: redis.Redis, total: int, size: int) -> None:
    """Replace the unacked hash with `total` copies of one real entry whose message is padded to `size`."""
    template = next(iter(client.hvals("unacked")))
    big = template.replace(b'"body": "', b'"body": "' + b"x" * size, 1)
    client.delete("unacked")
    fill = client.register_script(
        "for i = 1, tonumber(ARGV[1]) do redis.call('HSET', KEYS[1], 'bench-big-' .. i, ARGV[2]) end"
    )
    fill(keys=["unacked"], args=[total, big])


def measure(
    name: str, url: str, queues: list[str], calls: int, target: float | None, broker: BrokerOptions | None = None
) -> Row:
    pool = redis.ConnectionPool.from_url(url, connection_class=CountingConnection)
    source = CeleryRedisSource(url=url, client=redis.Redis(connection_pool=pool), broker=broker or BrokerOptions())
    admin = redis.Redis.from_url(url)
    try:
        source.observe(queues)  # connect and load the script
        admin.config_resetstat()
        CountingConnection.sent = 0
        walls: list[float] = []
        cpu_start = time.process_time()
        for _ in range(calls):
            started = time.perf_counter()
            source.observe(queues)
            walls.append(time.perf_counter() - started)
        cpu = time.process_time() - cpu_start
        evalsha = admin.info("commandstats").get("cmdstat_evalsha", {})
    finally:
        source.close()
        admin.close()
        pool.disconnect()
    walls.sort()
    return Row(
        scenario=name,
        queues=len(queues),
        round_trips=CountingConnection.sent / calls,
        cpu_ms=cpu / calls * 1000,
        wall_ms=sum(walls) / calls * 1000,
        wall_p99_ms=walls[min(calls - 1, int(calls * 0.99))] * 1000,
        server_ms=float(evalsha.get("usec_per_call", 0.0)) / 1000,
        target_cpu_ms=target,
    )


def print_table(rows: list[Row]) -> None:
    header = ("scenario", "queues", "round trips", "CPU ms", "wall ms", "wall p99", "redis ms", "CPU target")
    lines = [header]
    for r in rows:
        verdict = "-"
        if r.target_cpu_ms is not None:
            met = r.cpu_ms <= r.target_cpu_ms and r.round_trips == 1
            verdict = f"<= {r.target_cpu_ms:g} {'ok' if met else 'MISSED'}"
        lines.append(
            (
                r.scenario,
                str(r.queues),
                f"{r.round_trips:g}",
                f"{r.cpu_ms:.2f}",
                f"{r.wall_ms:.2f}",
                f"{r.wall_p99_ms:.2f}",
                f"{r.server_ms:.2f}",
                verdict,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def run(calls: int) -> list[Row]:
    autoscaler.celery.install()
    rows: list[Row] = []
    with redis_server() as url:
        app = Celery("bench", broker=url, set_as_current=False)
        step: Callable[[str], None] = lambda msg: print(f"... {msg}", file=sys.stderr)  # noqa: E731
        step(f"publishing {sum(POOL_QUEUES.values())} messages to {len(POOL_QUEUES)} queues")
        publish(app, POOL_QUEUES)
        pools = list(POOL_QUEUES)
        with app.connection_for_read() as conn:
            step(f"holding {UNACKED_HELD} messages unacked")
            hold_unacked(conn, pools, UNACKED_HELD)
            rows.append(measure("3 pools", url, pools, calls, CPU_TARGET_POOLS_MS))

            many = [f"queue-{i}" for i in range(MANY_QUEUES)]
            step(f"publishing {MANY_QUEUES * MESSAGES_PER_MANY_QUEUE} messages to {MANY_QUEUES} queues")
            publish(app, dict.fromkeys(many, MESSAGES_PER_MANY_QUEUE))
            rows.append(measure("1,000 queues", url, many, calls, CPU_TARGET_MANY_MS))

            client = redis.Redis.from_url(url)
            step(f"growing the unacked hash to {HUGE_UNACKED} entries")
            fill_huge_unacked(client, HUGE_UNACKED)
            client.close()
            rows.append(measure("3 pools, 100k unacked", url, pools, calls, None))

            client = redis.Redis.from_url(url)
            step(f"replacing the unacked hash with {BIG_UNACKED} messages of {BIG_UNACKED_BYTES // 1000} KB")
            fill_big_unacked(client, BIG_UNACKED, BIG_UNACKED_BYTES)
            rows.append(measure("2,000 x 100 KB unacked (1 MiB budget)", url, pools, max(calls // 10, 5), None))
            everything = BrokerOptions(unacked_bytes=1 << 30)
            rows.append(measure("2,000 x 100 KB unacked (read all)", url, pools, max(calls // 20, 3), None, everything))
            client.close()

        app.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="observe() calls per scenario")
    args = parser.parse_args()
    print_table(run(args.calls))


if __name__ == "__main__":
    main()
