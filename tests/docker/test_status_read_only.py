"""`autoscaler status` is a read: it reports what a tick would repair and removes nothing (Trust boundaries I,
defect 11). It ran the backend's status path, which removed leftover and failed containers, without holding
the leader lock and beside a controller that may be acting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dockertest import wait_until

from autoscaler.backends.compose import ComposeBackend
from autoscaler.backends.compose_model import KEEP_FAILED
from autoscaler.backends.docker_client import DockerConnection
from autoscaler.policy.model import PoolPolicy
from tests.docker.conftest import ProjectFactory

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.docker, pytest.mark.redis]
FAILED = KEEP_FAILED + 2


def test_status_removes_nothing_that_a_tick_would(compose_project: ProjectFactory, redis_url: str,
                                                   tmp_path: Path) -> None:
    project = compose_project("worker.yaml", "worker", tag="ro")
    (original,) = project.containers("worker")
    for number in range(90, 90 + FAILED):  # replicas that crashed at start: exit 3
        labels = {k: v for k, v in original.labels.items() if k != "autoscaler.clone"}
        labels["com.docker.compose.container-number"] = str(number)
        project.client.containers.run(original.image.id, ["-c", "raise SystemExit(3)"], entrypoint=["python"],
                                      labels=labels,
                                      name=f"{project.name}_worker_{number}", detach=True)
    wait_until(lambda: sum(c.status == "exited" for c in project.containers("worker")) == FAILED, timeout=60,
               what="the failed replicas to exit")
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"""pools:
  fast:
    target: {{compose: {{service: worker, project: {project.name}}}}}
    queues: [fast]
    min: 1
    max: 20
    tiers: [{{above: 100, replicas: 2}}]
""")
    env = {**os.environ, "AUTOSCALER_REDIS_URL": redis_url}
    proc = subprocess.run([sys.executable, "-m", "autoscaler.cli", "status", "--json", "--policy", str(policy)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    (pool,) = json.loads(proc.stdout)["pools"]
    assert pool["current"] == 1, pool
    assert len(project.containers("worker")) == 1 + FAILED, "`autoscaler status` removed containers"

    # A controller's tick does repair: it keeps the newest KEEP_FAILED failed replicas for `docker logs`.
    backend = ComposeBackend(docker_connection=DockerConnection())
    try:
        backend.status(PoolPolicy.model_validate({
            "name": "fast", "target": {"compose": {"service": "worker", "project": project.name}},
            "queues": ["fast"], "min": 1, "max": 20, "tiers": [{"above": 100, "replicas": 2}],
        }))
    finally:
        backend.close()
    assert len(project.containers("worker")) == 1 + KEEP_FAILED
