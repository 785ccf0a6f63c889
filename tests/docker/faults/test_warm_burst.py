"""A burst with push and warm standbys on, end to end: no task lost, and the pool never past `max + warm`.

The fault suite's app (faults.yaml: real Celery workers with late acks, a ledger that counts every task by id)
under an `autoscaler run` process whose policy has `push: true` and a pool of min 1, max 3, warm 2. Once the
two standbys answer, a burst is published right after a tick, so that the queue watch (not the next tick,
5 s away) wakes the scale-up: it activates the standbys, boots new ones to refill `warm`, and after the burst
the pool drains back to one replica and its two standbys. Sampled all along, the pool's containers never
exceed `max + warm`; at the end every published task has completed (a redelivered one is allowed, a missing
one is not), at least one task ran on an activated standby, and the controller counted an early evaluation.
"""

from __future__ import annotations

import re
import socket
import threading
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from dockertest import start_controller, wait_until
from rig import Controller, Rig

from autoscaler.clone_spec import ROLE_LABEL, STANDBY_ROLE

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.faults, pytest.mark.timeout(300)]

MIN, MAX, WARM = 1, 3, 2
BURST, SECONDS = 40, 0.5
POLICY = f"""\
interval: 5s
push: true
pools:
  fast:
    target: {{compose: {{service: worker, project: {{project}}}}}}
    queues: [fast]
    min: {MIN}
    max: {MAX}
    warm: {WARM}
    tiers: [{{above: 4, replicas: {MAX}}}, {{below: 1, replicas: {MIN}}}]
    cooldown: {{up: 0s, down: 2s}}
    stabilization: 3s
    stop_timeout: 30s
"""
DECISION = re.compile(r"pool fast current=(\d+) desired=(\d+) metric=")
PRESENT = ("created", "running", "restarting")  # what the backend counts toward max + warm


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _early_evaluations(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(r"^autoscaler_early_evaluations_total (\S+)$", text, re.MULTILINE)
    assert found is not None, text
    return float(found[1])


class Sampler:
    """Lists the pool's containers (one Engine call, by the project's labels) until stopped: the most present
    at once, and every container created as a standby."""

    def __init__(self, rig: Rig) -> None:
        self._list: Callable[[], list[dict[str, Any]]] = lambda: rig.project.client.api.containers(
            all=True, filters={"label": [f"com.docker.compose.project={rig.project.name}",
                                         "com.docker.compose.service=worker"]})
        self.most = 0
        self.standbys: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rows = self._list()
            self.most = max(self.most, sum(1 for row in rows if row["State"] in PRESENT))
            self.standbys |= {str(row["Id"]) for row in rows
                              if (row.get("Labels") or {}).get(ROLE_LABEL) == STANDBY_ROLE}
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _standbys_answer(rig: Rig) -> bool:
    standbys = [c for c in rig.project.containers("worker") if c.labels.get(ROLE_LABEL) == STANDBY_ROLE]
    if len(standbys) < WARM:
        return False
    app = Celery("warm-burst-ping", broker=rig.broker_url)
    try:
        replies = app.control.ping(destination=[f"celery@{c.id[:12]}" for c in standbys], timeout=2.0)
    finally:
        app.close()
    return len(replies) == len(standbys)


def test_burst_with_push_and_warm_standbys_loses_no_task(rig: Rig) -> None:
    rig.write_policy(POLICY.replace("{project}", rig.project.name))
    port = _free_port()
    controller = Controller(start_controller(
        rig.policy, rig.broker_url,
        env={"AUTOSCALER_STATE_REDIS_URL": rig.state_url, "AUTOSCALER_METRICS_PORT": str(port),
             "AUTOSCALER_METRICS_HOST": "127.0.0.1"},
    ))
    rig.controllers.append(controller)  # the rig stops it and shows its output
    sampler = Sampler(rig)
    try:
        # The steady state: one replica and two booted standbys that answer remote control.
        wait_until(lambda: _standbys_answer(rig) or None, timeout=120, what="the two standbys to answer",
                   interval=1)
        assert _early_evaluations(port) == 0
        # Right after a tick: the next is 5 s away, the queue watch looks every 250 ms.
        seen = len(controller.lines)
        wait_until(lambda: any(DECISION.search(line) for _, line in controller.lines[seen:]) or None,
                   timeout=60, what="a tick")
        rig.publish(BURST, SECONDS)

        tally = rig.wait_all_done(180)
        wait_until(lambda: controller.first(rf"scaled fast from {MAX} to {MIN} ") or None, timeout=120,
                   what="the scale-down", interval=1)
        # Back at min with its standbys: a decision at min while exactly min + warm containers are present.
        seen = len(controller.lines)
        wait_until(
            lambda: (any((m := DECISION.search(line)) and m[1] == m[2] == str(MIN)
                         for _, line in controller.lines[seen:])
                     and sum(1 for c in rig.project.containers("worker") if c.status in PRESENT) == MIN + WARM)
            or None,
            timeout=120, what=f"the pool back at {MIN} with {WARM} standbys", interval=1,
        )
    finally:
        sampler.stop()

    assert tally.lost == 0 and tally.completed == tally.published == BURST, tally
    assert tally.duplicated == 0, tally
    activated = [line for _, line in controller.lines if "scaled fast from" in line and "activated" in line]
    assert activated, controller.output()
    ledger = rig.ledger
    ran_on = {row.decode().split()[1] for row in ledger.lrange(f"{rig.run}:where", 0, -1)}
    ledger.close()
    assert ran_on & {container_id[:12] for container_id in sampler.standbys}, (ran_on, sampler.standbys)
    assert _early_evaluations(port) >= 1, controller.output()
    assert 0 < sampler.most <= MAX + WARM, sampler.most
