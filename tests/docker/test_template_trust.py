"""Nothing a broker client writes decides what container the autoscaler creates (Trust boundaries I, defect 1).

Redis is Celery's broker: every web and worker container, and any task code, can write it. Versions before
0.2 kept each service's container template (a whole `docker inspect`) there and cloned it at zero replicas,
so a broker client could make the autoscaler start a container with the host's `/` mounted, privileged, in
the host's PID and network namespaces. Here the attack is replayed against the real engine and the real
controller (`autoscaler run --once`): the service is scaled to zero, a hostile template is written where the
old versions read it, a burst asks for a replica, and the replica that starts must be the service's own, to
the letter, for every property a template could have changed. The old key is deleted, and no worker
environment is written to Redis.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from dockertest import publish, run_cli, wait_until

from autoscaler.backends.compose import ComposeBackend
from autoscaler.backends.docker_client import DockerConnection
from autoscaler.policy.model import PoolPolicy
from tests.docker.conftest import ProjectFactory

pytestmark = [pytest.mark.docker, pytest.mark.redis]

POLICY = """
interval: 1s
pools:
  fast:
    target: {{compose: {{service: worker, project: {project}}}}}
    queues: [fast]
    min: 0
    max: 2
    tiers:
      - {{above: 5, replicas: 1}}
      - {{below: 1, replicas: 0}}
    stop_timeout: 5s
"""

# (what the issue calls it, where it sits in `docker inspect`)
PROPERTIES = {
    "image": ("Image",),
    "command": ("Config", "Cmd"),
    "entrypoint": ("Config", "Entrypoint"),
    "user": ("Config", "User"),
    "environment": ("Config", "Env"),
    "mounts": ("HostConfig", "Binds"),
    "devices": ("HostConfig", "Devices"),
    "privileges": ("HostConfig", "Privileged"),
    "capabilities": ("HostConfig", "CapAdd"),
    "security options": ("HostConfig", "SecurityOpt"),
    "network mode": ("HostConfig", "NetworkMode"),
    "PID mode": ("HostConfig", "PidMode"),
    "IPC mode": ("HostConfig", "IpcMode"),
}


def _get(info: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = info
    for key in path:
        value = (value or {}).get(key)
    return value


def _hostile(original: dict[str, Any], python_image: str) -> dict[str, Any]:
    """The service's own inspect, turned into root on the host: what a broker client would write."""
    evil = json.loads(json.dumps(original))
    evil["Image"] = python_image
    evil["Config"].update(
        Image=python_image,
        Cmd=["-c", "cat /host/etc/shadow"],
        Entrypoint=["/bin/sh"],
        User="0:0",
        Env=["STOLEN=1", "PATH=/usr/bin:/bin"],
    )
    evil["HostConfig"].update(
        Binds=["/:/host", "/var/run/docker.sock:/var/run/docker.sock"],
        Devices=[{"PathOnHost": "/dev/null", "PathInContainer": "/dev/evil", "CgroupPermissions": "rwm"}],
        Privileged=True,
        CapAdd=["ALL"],
        SecurityOpt=["seccomp=unconfined", "apparmor=unconfined"],
        NetworkMode="host",
        PidMode="host",
        IpcMode="host",
    )
    return evil


@pytest.fixture
def attack(compose_project: ProjectFactory, redis_url: str, tmp_path: Path, docker_env: Any) -> dict[str, Any]:
    """Scale to zero, plant the hostile template, burst, `run --once`: the original and the new replica."""
    project = compose_project("worker.yaml", "worker", tag="trust")
    original = project.containers("worker")[0]
    original.reload()
    pool = PoolPolicy.model_validate({
        "name": "fast", "target": {"compose": {"service": "worker", "project": project.name}}, "queues": ["fast"],
        "min": 0, "max": 2, "tiers": [{"above": 5, "replicas": 1}], "stop_timeout": "5s",
    })
    backend = ComposeBackend(docker_connection=DockerConnection())
    try:
        backend.scale(pool, current=1, desired=0)
        wait_until(lambda: backend.status(pool).running == 0 and backend.draining(pool) == 0, timeout=60,
                   what="the service at zero")
    finally:
        backend.close()
    before = {c.id for c in project.containers("worker")}

    broker = redis.Redis.from_url(redis_url)
    key = f"autoscaler:template:{project.name}:worker"
    broker.set(key, json.dumps({"version": 1, "saved_at": 0, "container": _hostile(original.attrs,
                                                                                    docker_env.python_image)}))
    publish(redis_url, 20)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(project=project.name))
    proc = run_cli("run", "--once", "--policy", str(policy), redis_url=redis_url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    created = [c for c in project.containers("worker") if c.id not in before]
    assert len(created) == 1, f"expected one new replica:\n{proc.stderr[-3000:]}"
    created[0].reload()
    keys = {k.decode(): broker.type(k).decode() for k in broker.scan_iter()}
    values = [broker.get(k) or b"" for k, kind in keys.items() if kind == "string"]
    broker.close()
    return {"original": original.attrs, "clone": created[0].attrs, "old_key": key, "keys": keys,
            "values": values}


def test_a_template_written_to_the_broker_changes_nothing_in_the_created_container(attack: dict[str, Any]) -> None:
    """Image, command, entrypoint, user, environment, mounts, devices, privileges, capabilities, security
    options and network/PID/IPC mode of the new replica are the service's own, whatever Redis holds."""
    original, clone = attack["original"], attack["clone"]
    differing = {
        name: (_get(clone, path), _get(original, path))
        for name, path in PROPERTIES.items()
        if _get(clone, path) != _get(original, path)
    }
    assert not differing, f"the broker's template leaked into the new container: {differing}"
    assert clone["State"]["Running"], clone["State"]
    assert "STOLEN=1" not in (clone["Config"]["Env"] or [])


def test_the_old_template_key_is_deleted_and_no_worker_environment_reaches_redis(attack: dict[str, Any]) -> None:
    """The controller deletes the templates old versions left in the broker and writes none of its own:
    no key holds the workers' environment (their secrets, in production)."""
    assert attack["old_key"] not in attack["keys"], attack["keys"]
    assert not [k for k in attack["keys"] if ":template:" in k], attack["keys"]
    assert not [v for v in attack["values"] if b"GREETING=hello world" in v], "a worker's environment is in Redis"
