"""The README's Swarm sequence, as written: `scripts/swarm-up` on a single-node swarm, a burst, a policy edit.

`scripts/swarm-up` (with SWARM_POLICY pointing at a copy of tests/e2e/swarm-policy.yaml: the seed's tiers
with seconds-long cooldowns) builds the images, initialises the swarm if needed, labels the node, deploys
deploy/swarm-stack.yaml (as a stack named for this run, SWARM_STACK; plus the no-IPVS file where the kernel
has none) and waits for the migrations and every service. Then a burst takes <stack>_worker-fast from 2 to
10 and back to 2 with every task completed once; an edit of the policy rolls out as a new Swarm config;
`scripts/swarm-up --down` removes the stack. The swarm is left again only if this test created it and
nothing else runs on this engine (on Docker 20.10 `swarm leave --force` detaches running containers from
their networks: tests/docker/test_swarm_backend.py). The test touches only its own stack's configs.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.docker.dockertest import wait_until

pytestmark = [pytest.mark.docker, pytest.mark.e2e, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
POLICY = Path(__file__).resolve().parent / "swarm-policy.yaml"
# A stack name of its own per run: nothing left by another run (a volume with another password) or by a
# developer's own "celery" stack can meet it. The policy copy targets its services.
STACK = f"astest{uuid.uuid4().hex[:6]}"
BURST = 1500
OWN = {"label": f"com.docker.stack.namespace={STACK}"}


def _run(args: list[str], env: dict[str, str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


class SwarmStack:
    def __init__(self, client: docker.DockerClient, env: dict[str, str], policy: Path) -> None:
        self.client, self.env, self.policy = client, env, policy

    def up(self) -> subprocess.CompletedProcess[str]:
        return _run(["scripts/swarm-up"], self.env, timeout=900)

    def task_container(self, service: str) -> str:
        found = self.client.containers.list(filters={"label": f"com.docker.swarm.service.name={STACK}_{service}"})
        assert found, f"no running container of {STACK}_{service}"
        return str(found[0].id)

    def manage(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return _run(["docker", "exec", self.task_container("web"), "python", "manage.py", *args], self.env,
                    timeout=timeout)

    def running(self, service: str) -> int:
        tasks = self.client.api.tasks(filters={"service": f"{STACK}_{service}", "desired-state": "running"})
        return sum(1 for t in tasks if t["Status"]["State"] == "running")

    def service(self, name: str) -> dict[str, Any]:
        info: dict[str, Any] = self.client.api.inspect_service(f"{STACK}_{name}")
        return info

    def autoscaler_log(self, service: str = "autoscaler") -> str:
        """Both replicas' logs, read from their containers (`docker service logs` can hang on removed tasks)."""
        filters = {"label": f"com.docker.swarm.service.name={STACK}_{service}"}
        logs = []
        for summary in self.client.api.containers(all=True, filters=filters):
            try:
                logs.append(self.client.api.logs(summary["Id"]).decode(errors="replace"))
            except docker.errors.NotFound:
                continue
        return "\n".join(logs)


@pytest.fixture(scope="module")
def swarm(docker_setup: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwarmStack]:
    client = docker_setup.client
    was_in_swarm = client.info()["Swarm"]["LocalNodeState"] == "active"
    policy = tmp_path_factory.mktemp("swarm") / "policy.yaml"
    policy.write_text(POLICY.read_text().replace("celery_", f"{STACK}_"))
    env = {**os.environ, **docker_setup.images, "SWARM_POLICY": str(policy), "SWARM_STACK": STACK,
           "UP_TIMEOUT": "600"}
    stack = SwarmStack(client, env, policy)
    try:
        started = time.monotonic()
        proc = stack.up()
        assert proc.returncode == 0, f"scripts/swarm-up failed ({proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}"
        stack.env["SWARM_UP_SECONDS"] = f"{time.monotonic() - started:.0f}"
        yield stack
    finally:
        _run(["scripts/swarm-up", "--down"], env, timeout=120)
        in_stack = {"label": f"com.docker.stack.namespace={STACK}"}
        # A worker whose broker went first may sit in its warm shutdown, reconnecting, until its whole
        # stop_grace_period (minutes) is over: give the stack a little while, then remove what is left.
        # (The low-level list: the high-level one inspects each container and races their removal.)
        try:
            wait_until(lambda: not client.api.containers(all=True, filters=in_stack), timeout=45,
                       what="the stack's containers to go")
        except AssertionError:
            for summary in client.api.containers(all=True, filters=in_stack):
                with contextlib.suppress(docker.errors.NotFound):
                    client.api.remove_container(summary["Id"], force=True, v=True)
            wait_until(lambda: not client.api.containers(all=True, filters=in_stack), timeout=60,
                       what="the stack's containers to be removed")
        for volume in client.volumes.list(filters=in_stack):
            volume.remove(force=True)
        for config in client.configs.list(filters=OWN):
            with contextlib.suppress(docker.errors.NotFound):
                config.remove()
        if not was_in_swarm:
            others = sorted(str(c.name) for c in client.containers.list())
            if others:
                sys.stderr.write(f"\n[swarm] left this engine in swarm mode: leaving would cut {others} off their "
                                 "networks\n")
            else:
                client.swarm.leave(force=True)


def test_swarm_up_deploys_the_stack_migrated_with_one_leader(swarm: SwarmStack) -> None:
    """Every service at its count, the migration Complete, the worker-io pool on threads, one leader acting."""
    for service in ("db", "redis", "web", "worker-fast", "worker-cpu", "worker-io", "autoscaler"):
        wanted = swarm.service(service)["Spec"]["Mode"]["Replicated"]["Replicas"]
        assert wanted >= 1 and swarm.running(service) == wanted, (service, swarm.running(service), wanted)
    assert swarm.running("worker-fast") == 2 and swarm.running("autoscaler") == 2
    migrate = swarm.client.api.tasks(filters={"service": f"{STACK}_migrate"})
    assert any(t["Status"]["State"] == "complete" for t in migrate), migrate
    io_args = swarm.service("worker-io")["Spec"]["TaskTemplate"]["ContainerSpec"]["Args"]
    assert "--pool=threads" in " ".join(io_args), io_args

    def decided() -> str | None:
        text = swarm.autoscaler_log()
        return text if "pool fast current=2" in text else None

    log = wait_until(decided, timeout=120, what="a decision on the fast pool")
    assert log.count("this replica is now the leader") >= 1, _tail(log)


def test_a_burst_scales_fast_2_to_10_to_2_and_every_task_runs_once(swarm: SwarmStack) -> None:
    """1,500 notifications of 1 s: celery_worker-fast reaches 10, returns to 2, and all 1,500 succeed once."""
    run = f"swarm-{int(time.time())}"
    began = time.monotonic()
    proc = swarm.manage("loadgen", "--queue", "fast", "--count", str(BURST), "--latency-ms", "1000", "--run", run)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_until(lambda: swarm.running("worker-fast") == 10, timeout=240, what="celery_worker-fast at 10", interval=1)
    at_ten = time.monotonic() - began
    wait_until(lambda: swarm.running("worker-fast") == 2, timeout=420, what="celery_worker-fast back to 2",
               interval=1)
    back = time.monotonic() - began
    proc = swarm.manage("taskreport", "--run", run, "--wait", "240", "--json", "--limit", "0")
    report = json.loads(proc.stdout)
    assert report["ok"] and report["totals"]["succeeded"] == BURST, _tail(proc.stdout + proc.stderr)
    print(f"\n[swarm] swarm-up {swarm.env['SWARM_UP_SECONDS']} s; 2 -> 10 after {at_ten:.0f} s, back to 2 after "
          f"{back:.0f} s; {BURST} succeeded, redelivered {report['totals']['redelivered']}")
    # All of it through the socket proxy: the autoscaler has no socket and is not root; nothing was refused.
    spec = swarm.service("autoscaler")["Spec"]["TaskTemplate"]["ContainerSpec"]
    assert not spec.get("Mounts") and spec["User"] == "10001", spec
    assert "DOCKER_HOST=tcp://docker-socket-proxy:2375" in spec["Env"], spec["Env"]
    proxy_log = swarm.autoscaler_log("docker-socket-proxy")
    assert f"Swarm stacks {STACK} on" in proxy_log and "running as uid 65534" in proxy_log, _tail(proxy_log)
    assert "update service: POST" in proxy_log, _tail(proxy_log)
    assert " 403 " not in proxy_log, [line for line in proxy_log.splitlines() if " 403 " in line]


def test_a_policy_edit_rolls_out_as_a_new_config(swarm: SwarmStack) -> None:
    """Swarm configs are immutable: a changed policy gets a new config name, and the old one is removed."""
    before = {c.name for c in swarm.client.configs.list(filters={**OWN, "name": "autoscaler_policy_"})}
    swarm.policy.write_text(swarm.policy.read_text().replace("max: 4", "max: 5"))
    proc = swarm.up()
    assert proc.returncode == 0, _tail(proc.stdout + proc.stderr)
    configs = swarm.service("autoscaler")["Spec"]["TaskTemplate"]["ContainerSpec"]["Configs"]
    names = {c["ConfigName"] for c in configs}
    after = {c.name for c in swarm.client.configs.list(filters={**OWN, "name": "autoscaler_policy_"})}
    assert len(names) == 1 and names.isdisjoint(before), (names, before)
    assert after == names, f"old policy configs left behind: {after - names}"
