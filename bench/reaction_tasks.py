"""The reaction benchmark's task, run by the pool's workers (mounted by bench/reaction_compose.yaml).

The stack's own Celery app (Django settings, autodiscovered tasks, the liveness bootstep), so a worker boots
as the stack's worker-fast does, plus `bench.work`: it records in the ledger (broker Redis, db 1) which
worker started it and when (the first start per worker per burst: HSETNX), sleeps, then marks its index
done (a set, so a redelivered task is not counted twice, and a counter of runs, so it is seen).
"""

from __future__ import annotations

import os
import socket
import time

import redis
from core.celery import app

__all__ = ["app", "work"]

# The container's hostname is its short id: the name the autoscaler's busy probe and the bench both use.
HOST = socket.gethostname()
# Opened lazily per process: redis-py's pool notices the fork, but one per pool process is plainer.
_LEDGER: redis.Redis | None = None


def ledger() -> redis.Redis:
    global _LEDGER  # noqa: PLW0603 - one client per process
    if _LEDGER is None:
        _LEDGER = redis.Redis.from_url(os.environ["BENCH_LEDGER_URL"])
    return _LEDGER


@app.task(name="bench.work", ignore_result=True, acks_late=True)
def work(burst: str, index: int, seconds: float) -> None:
    started = time.time()
    ledger().hsetnx(f"bench:{burst}:first", HOST, repr(started))
    time.sleep(seconds)
    pipe = ledger().pipeline(transaction=False)
    pipe.sadd(f"bench:{burst}:done", index)
    pipe.incr(f"bench:{burst}:runs")
    pipe.execute()
