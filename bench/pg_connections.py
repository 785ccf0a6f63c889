"""Bench: how much memory PostgreSQL needs for the stack's connections at max scale (issue 11, 7).

Starts the stack's PostgreSQL image (POSTGRES_IMAGE, default the local stand-in) with the stack's
max_connections, opens connections in steps, each running what a Django worker runs per task (a catalog-
warming query, an INSERT ... ON CONFLICT into a table like TaskRun, a small sort), and prints the container's
memory (cgroup usage minus page cache) at each step, next to the stack's mem_limit.

    . scripts/images.env; .venv/bin/python bench/pg_connections.py [--steps 0,100,200,330]

Needs Docker and psycopg (the stack's requirements).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import time

import psycopg

SETUP = """
CREATE TABLE IF NOT EXISTS run (task_id text PRIMARY KEY, attempts int NOT NULL DEFAULT 1, status text,
                                payload jsonb, started timestamptz DEFAULT now());
"""
UPSERT = """
INSERT INTO run (task_id, status, payload) VALUES (%s, 'started', '{"k": 1}')
ON CONFLICT (task_id) DO UPDATE SET attempts = run.attempts + 1
"""
READS = [
    "SELECT c.relname, a.attname FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid "
    "WHERE c.relnamespace = 'public'::regnamespace ORDER BY 1, 2 LIMIT 50",
    "SELECT task_id FROM run ORDER BY started DESC LIMIT 100",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def memory_mb(container: str) -> float:
    """Container memory as the OOM killer sees it: usage minus inactive file cache (cgroup v1 or v2)."""
    script = ("if [ -f /sys/fs/cgroup/memory.current ]; then u=$(cat /sys/fs/cgroup/memory.current); "
              "f=$(awk '/^inactive_file /{print $2}' /sys/fs/cgroup/memory.stat); else "
              "u=$(cat /sys/fs/cgroup/memory/memory.usage_in_bytes); "
              "f=$(awk '/^total_inactive_file /{print $2}' /sys/fs/cgroup/memory/memory.stat); fi; echo $((u - f))")
    out = subprocess.run(["docker", "exec", container, "sh", "-c", script], capture_output=True, text=True,
                         check=True).stdout
    return int(out.strip()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="0,100,200,330")
    parser.add_argument("--max-connections", type=int, default=400)
    args = parser.parse_args()
    image = os.environ.get("POSTGRES_IMAGE", "autoscaler-local/postgres:15")
    port, name = free_port(), f"bench-pg-{os.getpid()}"
    subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:5432",
                    "-e", "POSTGRES_PASSWORD=bench", "--shm-size", "256m", image, "postgres", "-c",
                    f"max_connections={args.max_connections}"], check=True, capture_output=True)
    url = f"postgresql://postgres:bench@127.0.0.1:{port}/postgres"
    connections: list[psycopg.Connection] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(SETUP)
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        print(f"PostgreSQL {image}, max_connections={args.max_connections}; the stack's mem_limit is 1 GiB "
              "(stack/compose.yaml)")
        print(f"{'connections':>12} {'memory MiB':>11} {'per connection':>15}")
        base = None
        for step in [int(s) for s in args.steps.split(",")]:
            while len(connections) < step:
                conn = psycopg.connect(url, autocommit=True)
                conn.execute(UPSERT, (f"t{len(connections)}",))
                for query in READS:
                    conn.execute(query).fetchall()
                connections.append(conn)
            time.sleep(1)
            used = memory_mb(name)
            base = used if base is None else base
            per = (used - base) / step if step else 0.0
            print(f"{step:>12} {used:>11.0f} {per:>15.2f}")
    finally:
        for conn in connections:
            conn.close()
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)


if __name__ == "__main__":
    main()
