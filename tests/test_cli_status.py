"""`autoscaler status --json` against a real Redis holding real Celery messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.redis


def status_json(redis_url: str, policy: Path | str = "policies/default.yaml") -> dict:
    env = {
        **os.environ,
        "AUTOSCALER_REDIS_URL": redis_url,
        # No Docker here on purpose: `current` must come back null, not crash the command.
        "AUTOSCALER_DOCKER_HOST": "unix:///nonexistent/docker.sock",
    }
    out = subprocess.run(
        [sys.executable, "-m", "autoscaler.cli", "status", "--policy", str(policy), "--json"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_status_counts_exactly_n_with_mixed_priorities(redis_url: str) -> None:
    """N messages published by Celery with priorities 0-9 on a queue are reported as exactly N waiting."""
    app = Celery("producer", broker=redis_url)
    app.conf.broker_transport_options = {"queue_order_strategy": "priority"}
    n = 257
    with app.producer_or_acquire() as producer:
        for i in range(n):
            app.send_task("tasks.noop", queue="fast", priority=i % 10, producer=producer)
    app.close()

    report = status_json(redis_url)
    fast = next(p for p in report["pools"] if p["name"] == "fast")
    # latency_s depends on whether an earlier test in this process installed the publish stamp.
    assert [(q["name"], q["waiting"], q["unacked"]) for q in fast["queues"]] == [("fast", n, 0)]
    assert fast["current"] is None  # no backend answered
    assert "cannot" in fast["reason"] or "unknown" in fast["reason"]
    assert {p["name"] for p in report["pools"]} == {"fast", "cpu", "io"}


def test_status_when_redis_is_unreachable(redis_url: str) -> None:
    """With Redis unreachable, status still answers, every pool holding, and says why."""
    report = status_json("redis://127.0.0.1:1/0")
    assert "cannot reach Redis" in report["metric_error"]
    for pool in report["pools"]:
        assert pool["queues"] == []
        assert pool["current"] is None
