"""The Celery app of the graceful scale-down tests: one task that records where and when it ran.

Broker settings mirror what a production pool should use for safe scale-down: late acks, reject on worker
loss, prefetch 1. The visibility timeout and restore sweep are short so a killed worker's message comes back
within seconds instead of an hour.
"""

import os
import socket
import time

import redis
from celery import Celery

BROKER_URL = os.environ.get("BROKER_URL", "redis://redis:6379/0")
VISIBILITY_TIMEOUT = float(os.environ.get("VISIBILITY_TIMEOUT", "10"))

app = Celery("astest", broker=BROKER_URL)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_concurrency=1,
    task_default_queue="fast",
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
)


@app.task(name="astest.work")
def work(key: str, seconds: float) -> str:
    """Sleep `seconds`, recording start and finish (host, time) under `key` in Redis."""
    r = redis.Redis.from_url(BROKER_URL)
    host = socket.gethostname()
    r.rpush(f"{key}:started", f"{host} {time.time()}")
    time.sleep(seconds)
    r.rpush(f"{key}:done", f"{host} {time.time()}")
    return host


# The fault suite's unit of work (tests/docker/faults). Its ledger is a Redis of its own, not the broker the
# suite restarts: a delivery is counted when it starts and a completion when it ends, by task id, so the
# suite can say of every published task whether it completed once, was redelivered, or was lost.
LEDGER_URL = os.environ.get("LEDGER_URL", BROKER_URL)


@app.task(name="astest.job", bind=True)
def job(self, run: str, seconds: float, padding: str = "") -> None:  # type: ignore[no-untyped-def]
    ledger = redis.Redis.from_url(LEDGER_URL)
    task_id = self.request.id
    ledger.hincrby(f"{run}:started", task_id, 1)
    ledger.rpush(f"{run}:where", f"{task_id} {socket.gethostname()} {os.getpid()} {time.time()}")
    time.sleep(seconds)
    ledger.hincrby(f"{run}:done", task_id, 1)
    ledger.close()
