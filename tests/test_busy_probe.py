"""The busy-worker probe stops waiting once every worker it expects has answered (issue 19, item 2).

A real Redis and a real Celery worker process. The probe's timeout is ten minutes here: it returning at all
within the test's bound means it stopped listening when the worker answered (before, it always waited its
whole timeout, about a second per scale-down tick in production).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from autoscaler.backends.celery_busy import CeleryBusyProbe
from autoscaler.policy.model import PoolPolicy

pytestmark = pytest.mark.redis

APP = '''
import os, threading
from celery import Celery
app = Celery("probe-test", broker=os.environ["BROKER"])
release = threading.Event()

@app.task(name="probe.hold")
def hold() -> None:
    release.wait(60)
'''
POOL = PoolPolicy.model_validate({
    "name": "fast", "queues": ["fast"], "min": 1, "max": 4, "tiers": [{"above": 100, "replicas": 4}],
    "target": {"compose": {"service": "worker"}},
})


@pytest.fixture
def worker(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """One Celery worker (solo pool) on the test's Redis; yields its host (the part after @ in its node name)."""
    (tmp_path / "probeapp.py").write_text(APP)
    host = f"probe-{uuid.uuid4().hex[:10]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "probeapp", "worker", "-P", "solo", "-n", f"w@{host}", "-Q", "probe",
         "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"],
        cwd=tmp_path, env={**os.environ, "BROKER": redis_url}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    app = Celery("probe-ping", broker=redis_url)
    try:
        deadline = time.monotonic() + 120
        while not app.control.ping(destination=[f"w@{host}"], timeout=0.5):
            assert proc.poll() is None, "the worker exited"
            assert time.monotonic() < deadline, "the worker never answered a ping"
        yield host
    finally:
        app.close()
        proc.terminate()
        proc.wait(timeout=30)


def test_the_busy_probe_returns_once_every_expected_worker_answered(redis_url: str, worker: str) -> None:
    probe = CeleryBusyProbe(broker_url=redis_url, timeout=600.0)
    answer: list[set[str] | None] = []
    thread = threading.Thread(target=lambda: answer.append(probe(POOL, hosts=frozenset({worker}))), daemon=True)
    try:
        thread.start()
        thread.join(timeout=60)  # a bound for a loaded machine, ten times less than the probe's own timeout
        assert not thread.is_alive(), "the probe waited for its timeout although the worker had answered"
        assert answer == [set()]  # answered, and idle: not None ("unknown")
    finally:
        probe.close()


def test_a_probe_asked_while_another_pools_probe_waits_gets_its_own_answer() -> None:
    """Two pools' actions scale down at once (one thread each) and share the one probe: the second must wait its
    turn and get an answer, not None, which on Swarm would let Swarm choose the victims (issue 19 review).

    The broker's side is scripted (a gate holds the first broadcast): what is tested is the probe's own queueing."""
    probe = CeleryBusyProbe(broker_url="redis://127.0.0.1:1/0", timeout=60.0)
    first_waiting, release = threading.Event(), threading.Event()
    asked: list[frozenset[str] | None] = []

    def scripted_ask(hosts: frozenset[str] | None = None) -> dict[str, object] | None:
        asked.append(hosts)
        if len(asked) == 1:
            first_waiting.set()
            release.wait(60)
        return {f"celery@{host}": [{"id": "t"}] if host.startswith("busy") else [] for host in hosts or ()}

    probe._ask = scripted_ask  # type: ignore[method-assign]
    answers: dict[str, dict[str, bool] | None] = {}
    io = PoolPolicy.model_validate({**POOL.model_dump(), "name": "io"})

    def act(pool: PoolPolicy, hosts: frozenset[str]) -> None:
        answers[pool.name] = probe.workers(pool, hosts=hosts)

    first = threading.Thread(target=act, args=(POOL, frozenset({"aaa"})), daemon=True)
    second = threading.Thread(target=act, args=(io, frozenset({"busy-b", "ccc"})), daemon=True)
    try:
        first.start()
        assert first_waiting.wait(60)
        second.start()
        second.join(timeout=2)  # before the fix it returned None at once; now it waits its turn
        release.set()
        first.join(timeout=60)
        second.join(timeout=60)
        assert answers == {"fast": {"celery@aaa": False}, "io": {"celery@busy-b": True, "celery@ccc": False}}
        assert asked == [frozenset({"aaa"}), frozenset({"busy-b", "ccc"})]
    finally:
        release.set()
        probe.close()
