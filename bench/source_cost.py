"""Bench: what one `CeleryRedisSource.observe()` costs, against a real redis-server it starts itself.

Run from the repository root::

    .venv/bin/python bench/source_cost.py [--calls 200]

Scenarios: 3 queues with a few thousand Celery messages across priorities plus a few hundred unacked
(held by a real kombu consumer); 1,000 queues; 3 queues with a 100k-entry unacked hash (sampled); and 3
queues with 2,000 unacked messages of 100 KB, read with the default byte budget (1 MiB) and, for the side
by side, with a budget that reads them all (what every read did before the budget).
Then the big-data cases of issue 17 (item 5), each on a fresh redis-server without `maxmemory`: four
85 MB oldest messages (one per priority sub-list of a queue), three 300 MB oldest messages (one per
queue), and 2,000 unacked entries with 100 KB field names. Target: <= 5 ms of Redis time per read each.
Per call it reports Redis round trips (counted on the client connection), controller CPU time
(`time.process_time`), wall time, and Redis server time (INFO commandstats usec_per_call of EVALSHA).
Targets: 1 round trip; <= 5 ms CPU for 3 pools; <= 50 ms CPU for 1,000 queues.
"""

from __future__ import annotations

import argparse
import math
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
from autoscaler.sources.base import SourceError
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
# Issue 17, item 5: data the read must not copy whole.
BIG_STAMPED = {"4 x 85 MB oldest messages": (4, 85_000_000), "3 x 300 MB oldest messages": (3, 300_000_000)}
BIG_NAMES, BIG_NAME_BYTES = 2000, 100_000
REDIS_TARGET_BIG_MS = 5.0


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
    target_redis_ms: float | None = None
    error: str | None = None


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
    name: str,
    url: str,
    queues: list[str],
    calls: int,
    target: float | None,
    broker: BrokerOptions | None = None,
    target_redis_ms: float | None = None,
) -> Row:
    pool = redis.ConnectionPool.from_url(url, connection_class=CountingConnection)
    source = CeleryRedisSource(url=url, client=redis.Redis(connection_pool=pool), broker=broker or BrokerOptions())
    admin = redis.Redis.from_url(url)
    error = None
    walls: list[float] = []
    cpu = 0.0
    try:
        source.observe(queues)  # connect and load the script
        admin.config_resetstat()
        CountingConnection.sent = 0
        cpu_start = time.process_time()
        for _ in range(calls):
            started = time.perf_counter()
            source.observe(queues)
            walls.append(time.perf_counter() - started)
        cpu = time.process_time() - cpu_start
    except SourceError as exc:  # what the controller would log; the row says the read failed
        error = str(exc)[:100]
    finally:
        evalsha = admin.info("commandstats").get("cmdstat_evalsha", {})
        source.close()
        admin.close()
        pool.disconnect()
    walls.sort()
    done = max(len(walls), 1)
    return Row(
        scenario=name,
        queues=len(queues),
        round_trips=CountingConnection.sent / done,
        cpu_ms=cpu / done * 1000,
        wall_ms=sum(walls) / done * 1000,
        wall_p99_ms=walls[min(done - 1, int(done * 0.99))] * 1000 if walls else math.nan,
        server_ms=float(evalsha.get("usec_per_call", 0.0)) / 1000,
        target_cpu_ms=target,
        target_redis_ms=target_redis_ms,
        error=error,
    )


def print_table(rows: list[Row]) -> None:
    header = ("scenario", "queues", "round trips", "CPU ms", "wall ms", "wall p99", "redis ms", "target")
    lines = [header]
    for r in rows:
        verdict = "-"
        if r.error is not None:
            verdict = f"READ FAILED: {r.error}"
        elif r.target_cpu_ms is not None:
            met = r.cpu_ms <= r.target_cpu_ms and r.round_trips == 1
            verdict = f"CPU <= {r.target_cpu_ms:g} {'ok' if met else 'MISSED'}"
        elif r.target_redis_ms is not None:
            met = r.server_ms <= r.target_redis_ms and r.round_trips == 1
            verdict = f"redis <= {r.target_redis_ms:g} {'ok' if met else 'MISSED'}"
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
    rows.extend(run_big(max(calls // 20, 3)))
    return rows


def push_big(client: redis.Redis, key: str, size: int) -> None:
    """One stamped kombu-shaped message of `size` bytes, built inside Redis (no 300 MB over the socket)."""
    build = client.register_script(
        "redis.call('LPUSH', KEYS[1], '{\"body\": \"' .. string.rep('x', tonumber(ARGV[1])) .. "
        "'\", \"headers\": {\"' .. ARGV[2] .. '\": ' .. ARGV[3] .. '}, \"properties\": {}}')"
    )
    build(keys=[key], args=[size, autoscaler.celery.PUBLISHED_AT_HEADER, time.time() - 60])


def run_big(calls: int) -> list[Row]:
    """Issue 17's big-data cases, each on its own redis-server (no maxmemory: the 300 MB case needs it)."""
    rows: list[Row] = []
    step: Callable[[str], None] = lambda msg: print(f"... {msg}", file=sys.stderr)  # noqa: E731
    sep = BrokerOptions().separator
    for name, (count, size) in BIG_STAMPED.items():
        with redis_server() as url:
            client = redis.Redis.from_url(url)
            step(f"{name}: pushing {count} messages of {size // 1_000_000} MB")
            if count == 4:  # one queue, one message per priority sub-list (steps 0, 3, 6, 9)
                queues = ["fast"]
                keys = ["fast", f"fast{sep}3", f"fast{sep}6", f"fast{sep}9"]
            else:
                queues = keys = [f"big-{i}" for i in range(count)]
            for key in keys:
                push_big(client, key, size)
            client.close()
            rows.append(measure(name, url, queues, calls, None, target_redis_ms=REDIS_TARGET_BIG_MS))
    with redis_server() as url:
        client = redis.Redis.from_url(url)
        step(f"{BIG_NAMES} unacked entries with {BIG_NAME_BYTES // 1000} KB field names")
        entry = '[{"body": "e30=", "headers": {}}, "", "fast"]'
        fill = client.register_script(
            "local pad = string.rep('n', tonumber(ARGV[2])) "
            "for i = 1, tonumber(ARGV[1]) do redis.call('HSET', KEYS[1], i .. pad, ARGV[3]) end"
        )
        fill(keys=["unacked"], args=[BIG_NAMES, BIG_NAME_BYTES, entry])
        client.close()
        rows.append(
            measure(
                f"{BIG_NAMES:,} unacked, 100 KB names", url, list(POOL_QUEUES), calls, None,
                target_redis_ms=REDIS_TARGET_BIG_MS,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="observe() calls per scenario")
    args = parser.parse_args()
    print_table(run(args.calls))


if __name__ == "__main__":
    main()
