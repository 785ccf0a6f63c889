"""SIGTERM while warm shutdowns are under way: the controller exits at once, the drains recorded (issue 17, 10a).

The stop threads were joined at interpreter exit, so a controller told to stop during a ten-minute warm
shutdown hung until its own stop grace ran out and was SIGKILLed. The stops are the daemon's to finish (it
sends SIGKILL at the grace whether or not the caller is still connected); the controller's part is to leave
their marks in the pool's state for the next leader. A real `autoscaler run` process and a real Redis; the
engine is scripted, its stops answering never, as a busy worker's would not for ten minutes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from autoscaler.backends.memory import MemoryBackend
from autoscaler.policy.model import PoolPolicy
from tests.docker.dockertest import start_controller, wait_until
from tests.scripted_engine import ScriptedEngine
from tests.test_loop import POLICY as TWO_POOLS
from tests.test_loop import make_controller

pytestmark = pytest.mark.redis

POLICY = """
interval: 1s
pools:
  fast:
    target: {compose: {service: worker, project: p}}
    queues: [fast]
    min: 1
    max: 5
    tiers: [{above: 100, replicas: 5}, {below: 10, replicas: 1}]
    cooldown: {up: 0s, down: 0s}
    stabilization: 0s
    stop_timeout: 10m
"""


def test_sigterm_during_long_stops_exits_promptly_with_the_drains_in_the_state(
    redis_url: str, tmp_path: Path
) -> None:
    engine = ScriptedEngine(clock=time.time)
    engine.add_running(3)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    state = redis.Redis.from_url(redis_url)
    controller = start_controller(policy, redis_url, env={"AUTOSCALER_DOCKER_HOST": engine.url,
                                                          "AUTOSCALER_BUSY_PROBE_TIMEOUT": "0.2"})
    try:
        # 3 -> 1: two stops under way, neither answering (busy workers with a ten-minute grace).
        wait_until(lambda: len(engine.received()) == 2, timeout=60, what="the two stops")
        wait_until(lambda: (raw := state.get("autoscaler:state:fast")) and len(json.loads(raw)["draining"]) == 2,
                   timeout=30, what="the marks in the state")
        controller.send_signal(signal.SIGTERM)
        try:
            out, _ = controller.communicate(timeout=30)  # far below the 10 min the stops could take
        except subprocess.TimeoutExpired:
            controller.kill()
            out, _ = controller.communicate()
            pytest.fail(f"the controller did not exit on SIGTERM while its stops were under way:\n{out}")
        assert controller.returncode == 0, out
        marks = json.loads(state.get("autoscaler:state:fast") or b"{}")["draining"]
        sent = {s.container: s.at for s in engine.received()}
        assert {cid for cid, _ in marks} == set(sent), out
        # Each deadline runs from its SIGTERM (whole seconds apart at most: two clocks, one machine).
        assert all(abs(deadline - (sent[cid] + 600)) < 2 for cid, deadline in marks), (marks, sent)
        assert not state.exists("autoscaler:leader"), "the lock should be released for the next leader"
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.communicate()
        engine.close()
        state.close()


class DrainingBackend(MemoryBackend):
    """In memory; `marks` are what its drains report (a stop sent after the tick read them)."""

    marks: tuple[tuple[str, float], ...] = ()

    def drain_marks(self, pool: PoolPolicy) -> tuple[tuple[str, float], ...]:
        return self.marks if pool.name == "fast" else ()


def test_stepping_down_writes_the_drains_under_way_then_releases_the_lock(redis_url: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(TWO_POOLS)
    backend = DrainingBackend({"worker-fast": 2, "worker-io": 2})
    controller = make_controller(redis_url, policy, backend)
    state = redis.Redis.from_url(redis_url)
    assert controller.tick().role == "leader"
    assert json.loads(state.get("autoscaler:state:fast") or b"{}").get("draining") in (None, [])
    backend.marks = (("c" * 64, 1_000_600.0),)
    controller.stop()
    assert json.loads(state.get("autoscaler:state:fast") or b"{}")["draining"] == [["c" * 64, 1_000_600.0]]
    assert not state.exists("autoscaler:leader")
