"""`autoscaler run` as ops run it: the real CLI process against a real Compose project and a real Redis."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.docker.conftest import ProjectFactory
from tests.docker.dockertest import REPO, cli_env, publish, run_cli

pytestmark = [pytest.mark.docker, pytest.mark.redis]

POLICY = """
interval: 1s
pools:
  fast:
    target: {{compose: {{service: worker, project: {project}}}}}
    queues: [fast]
    min: 2
    max: 10
    tiers:
      - {{above: 500, replicas: 10}}
      - {{above: 100, replicas: 5}}
      - {{below: 10, replicas: 2}}
    stop_timeout: 5s
"""


def test_run_once_scales_two_to_ten_and_dry_run_changes_nothing(
    compose_project: ProjectFactory, redis_url: str, tmp_path: Path
) -> None:
    """With 600 waiting fast tasks, `run --once --dry-run` logs the 2 -> 10 decision and changes nothing;
    `run --once` then takes the Compose service from 2 to 10 containers that docker-compose ps lists."""
    project = compose_project("worker.yaml", "worker", tag="once")
    project.run("up", "-d", "--scale", "worker=2", "worker")
    assert len(project.running_ids("worker")) == 2
    publish(redis_url, 600)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(project=project.name))

    dry = run_cli("run", "--once", "--dry-run", "--policy", str(policy), redis_url=redis_url)
    assert dry.returncode == 0, dry.stderr
    assert "would scale fast from 2 to 10: 600 > 500" in dry.stderr
    assert len(project.running_ids("worker")) == 2

    started = time.monotonic()
    real = run_cli("run", "--once", "--policy", str(policy), redis_url=redis_url)
    took = time.monotonic() - started
    assert real.returncode == 0, real.stderr
    assert "scaled fast from 2 to 10" in real.stderr
    running = project.running_ids("worker")
    assert len(running) == 10
    assert project.ps_ids("worker") == running
    print(f"\nrun --once 2 -> 10 (process start to exit, 8 containers created and started): {took:.1f}s")


def test_sigterm_stops_between_ticks_and_releases_the_lock(
    compose_project: ProjectFactory, redis_url: str, tmp_path: Path
) -> None:
    """SIGTERM makes a running controller finish its tick, release the leader lock and exit 0."""
    project = compose_project("worker.yaml", "worker", tag="term")
    project.run("up", "-d", "--scale", "worker=2", "worker")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(project=project.name))
    proc = subprocess.Popen([sys.executable, "-m", "autoscaler.cli", "run", "--policy", str(policy)],
                            cwd=REPO, env=cli_env(redis_url), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 30
    while client.get("autoscaler:leader") is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.get("autoscaler:leader") is not None, "the controller never took the leader lock"
    time.sleep(1.5)  # a couple of ticks
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "received SIGTERM; stopping after the current tick" in out
    assert client.get("autoscaler:leader") is None  # handed over at once, not left to expire
    assert len(project.running_ids("worker")) == 2  # nothing to do at depth 0, and nothing was done
