"""Two real controller processes and a leader frozen in the middle of a Docker call (Trust boundaries II, 1).

Each controller reaches the engine through its own recording relay (tests/docker/recording_proxy.py), so
the test sees every Engine API call each process makes. Leader A starts a scale-up; its creates are
forwarded to the engine but the answers are held, and A is SIGSTOPped once all four are sent. Its lease
runs out, B takes over and acts. A is SIGCONTed and its answers released: A must make no further Docker
call (its next one, the start of the container it created, is stopped by the lease check) and no scale
action. What A had in
flight when it froze (the creates the engine already carried out) is the residual window: never started,
counted by B within `max`, and removed by the leftover repair.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from dockertest import publish, start_controller, wait_until
from recording_proxy import RecordingProxy

from tests.docker.conftest import ProjectFactory

pytestmark = [pytest.mark.docker, pytest.mark.redis]

POLICY = """
interval: 1s
pools:
  fast:
    target: {{compose: {{service: worker, project: {project}}}}}
    queues: [fast]
    min: 1
    max: 5
    tiers: [{{above: 100, replicas: 5}}, {{below: 10, replicas: 1}}]
    cooldown: {{up: 0s, down: 10m}}
    stabilization: 0s
"""


class Controller:
    def __init__(self, name: str, policy: Path, redis_url: str, proxy: RecordingProxy) -> None:
        self.name = name
        self.proxy = proxy
        self.lines: list[tuple[float, str]] = []
        self.process = start_controller(policy, redis_url,
                                        env={"AUTOSCALER_INSTANCE_ID": name, "DOCKER_HOST": proxy.url})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append((time.time(), line.rstrip()))

    def said(self, text: str, *, since: float = 0.0) -> list[str]:
        return [line for at, line in list(self.lines) if at >= since and text in line]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def test_a_leader_frozen_mid_call_makes_no_call_after_it_resumes(
    compose_project: ProjectFactory, redis_url: str, tmp_path: Path
) -> None:
    project = compose_project("worker.yaml", "worker", tag="fence")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(project=project.name))
    relay_a, relay_b = RecordingProxy(), RecordingProxy()
    a = Controller("a", policy, redis_url, relay_a)
    b = None
    try:
        wait_until(lambda: a.said("now the leader"), timeout=30, what="A to lead")
        b = Controller("b", policy, redis_url, relay_b)
        wait_until(lambda: b.said("now a standby"), timeout=30, what="B to stand by")
        relay_a.hold_after(r"^POST \S*/containers/create")
        publish(redis_url, 150)
        wait_until(relay_a.held.is_set, timeout=30, what="A to send its first create")
        # A creates its four clones from parallel threads, each after its own lease check: frozen between
        # a check and its send, a thread would send after SIGCONT (the residual window the module docstring
        # names, not what this test is about). Every answer is held, so once all four are sent A is idle.
        wait_until(lambda: sum("/containers/create" in r.path for r in relay_a.since(0)) >= 4 or None,
                   timeout=15, what="A to send all four creates")
        os.kill(a.process.pid, signal.SIGSTOP)
        frozen = time.time()

        wait_until(lambda: b.said("now the leader"), timeout=15, what="B to take over from the frozen A")
        took_over = time.time() - frozen
        wait_until(lambda: b.said("fast current="), timeout=15, what="B to reconcile the pool")
        time.sleep(2)  # a few of B's ticks

        resumed = time.time()
        os.kill(a.process.pid, signal.SIGCONT)
        relay_a.release()
        time.sleep(6)  # several of A's ticks (a standby polls four times an interval)

        calls_after = relay_a.since(resumed)
        assert calls_after == [], f"A made Docker calls after it resumed without its lease: {calls_after}"
        assert a.said("lost the leader lease before", since=resumed), a.lines[-20:]
        assert not a.said("scaled fast", since=resumed)
        assert a.said("now a standby", since=resumed)
        assert relay_b.since(resumed), "B stopped acting"
        # The residual window stays within max: A's in-flight creates count for B.
        containers = project.containers("worker")
        assert len(containers) <= 5, [(c.name, c.status) for c in containers]
        assert took_over < 5, f"B took {took_over:.1f}s to take over (lease 1.5 s, standby polls every 0.25 s)"
    finally:
        relay_a.release()
        for controller in (a, b):
            if controller is not None:
                controller.stop()
        relay_a.close()
        relay_b.close()
