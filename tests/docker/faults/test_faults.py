"""Real faults during a real burst: every published task completes (once, or redelivered), none is lost.

Each case runs the fault suite's app (tests/docker/compose/faults.yaml: a broker with AOF, real Celery
workers with late acks, reject-on-worker-lost and prefetch 1) under an `autoscaler run` process, publishes a
burst that takes the pool 1 -> 4 and back, breaks something in the middle, and then accounts for every task
by id in a ledger Redis that no fault touches. It also counts the controller's actions: a burst needs one
scale-up and at most two scale-downs (4 -> 2 -> 1); a fault may add the actions that repair it, but the
direction may change only once (no flapping). The table at the end of the run (conftest.py) is the
README's reliability table.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from dockertest import wait_until
from rig import Report, Rig, Tally, reversals

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.faults, pytest.mark.timeout(420)]

BURST, SECONDS = 24, 2.0
DECISION = r"pool fast current=\d+ desired=\d+ metric=\S+: "


def _ready(rig: Rig) -> None:
    """A controller has ticked on the idle pool once: the burst starts from a steady state."""
    wait_until(lambda: any(c.first(DECISION) for c in rig.controllers) or None, timeout=60,
               what="the controller's first decision")


def _scaled_up(rig: Rig, to: int = 4, timeout: float = 60) -> None:
    wait_until(lambda: rig.running() >= to or None, timeout=timeout, what=f"the pool at {to}", interval=0.5)


def _back_down(rig: Rig, timeout: float = 120) -> None:
    wait_until(lambda: rig.running() == 1 or None, timeout=timeout, what="the pool back at 1", interval=1)


def _check(tally: Tally) -> None:
    assert tally.lost == 0, tally
    assert tally.duplicated == 0, tally
    assert tally.completed == tally.published, tally


def test_redis_restarts_mid_burst(rig: Rig, fault_report: Report) -> None:
    controller = rig.start_controller()
    _ready(rig)
    rig.publish(BURST, SECONDS)
    _scaled_up(rig)
    broker = rig.project.containers("redis")[0]
    stopped = time.monotonic()
    broker.stop(timeout=10)
    time.sleep(5)
    broker.start()
    started = time.monotonic()
    saw = controller.first("metric unavailable", after=stopped)
    tally = rig.wait_all_done(180)
    _back_down(rig)
    recovered = controller.first(DECISION + r"(?!metric unavailable)", after=started)
    actions = controller.actions()
    fault_report.add(
        "Redis restarts mid-burst (down 5 s, AOF)", tally, actions=len(actions), reversals=reversals(actions),
        recover_s=None if recovered is None else recovered[0] - started,
        operator_saw=saw[1] if saw else "(no tick while Redis was away)",
    )
    _check(tally)
    assert saw is not None, controller.output()
    assert recovered is not None, controller.output()
    assert reversals(actions) <= 1 and len(actions) <= 4, actions


def test_controller_killed_mid_scale_up_and_mid_drain(rig: Rig, fault_report: Report) -> None:
    first = rig.start_controller()
    _ready(rig)
    rig.publish(BURST, SECONDS)
    # Killed as soon as it starts the scale-up (its first create is in flight or just done).
    wait_until(lambda: rig.project.containers("worker").__len__() > 1 or None, timeout=60,
               what="the scale-up to begin", interval=0.1)
    first.kill()
    killed = time.monotonic()
    second = rig.start_controller()
    _scaled_up(rig)
    # The replacement takes over when the dead leader's lease ends, and does not create beyond max.
    assert len(rig.project.containers("worker")) <= 4
    wait_until(lambda: second.first("scaled fast from 4 to") or None, timeout=120, what="the scale-down")
    second.kill()
    drain_killed = time.monotonic()
    third = rig.start_controller()
    tally = rig.wait_all_done(180)
    _back_down(rig)
    took_over = second.first(DECISION, after=killed)
    actions = first.actions() + second.actions() + third.actions()
    fault_report.add(
        "controller SIGKILLed mid-scale-up, then mid-drain", tally, actions=len(actions),
        reversals=reversals(actions), recover_s=None if took_over is None else took_over[0] - killed,
        operator_saw=(third.first("resuming the drain", after=drain_killed) or (0, "(drain already done)"))[1],
    )
    _check(tally)
    assert max(len(rig.project.containers("worker")), 1) <= 4
    assert reversals(actions) <= 1, actions


def test_worker_pool_child_killed_mid_task(rig: Rig, fault_report: Report) -> None:
    controller = rig.start_controller()
    _ready(rig)
    rig.publish(BURST, SECONDS)
    # A long task behind the burst: the fault hits it mid-task, whenever it starts. (Killing a whole worker
    # container is not part of this case yet: in one run of two its task, restored after the visibility
    # timeout, sat in the queue for over two minutes with one replica running; see the closing note.)
    # Shorter than the visibility timeout (10 s): a longer task is delivered again while it still runs.
    (child_victim,) = rig.publish(1, 6.0)
    _scaled_up(rig)
    # The prefork child running it dies with SIGKILL: reject_on_worker_lost requeues it at once.
    wait_until(lambda: rig.where(child_victim) or None, timeout=90, what="the first long task", interval=0.1)
    host, pid = rig.where(child_victim)[0]
    container = next(c for c in rig.project.containers("worker") if c.id.startswith(host))
    killed = time.monotonic()
    code, out = container.exec_run(["python", "-c", f"import os; os.kill({pid}, 9)"])
    assert code == 0, out
    wait_until(lambda: len(rig.where(child_victim)) >= 2 or None, timeout=60, what="the redelivery", interval=0.1)
    child_wait = time.monotonic() - killed
    tally = rig.wait_all_done(180)
    _back_down(rig)
    actions = controller.actions()
    fault_report.add(
        "worker's pool child SIGKILLed mid-task", tally, actions=len(actions),
        reversals=reversals(actions), recover_s=child_wait,
        operator_saw=f"the task redelivered {child_wait:.1f} s after its child was killed; attempts 2",
    )
    _check(tally)
    assert len(rig.where(child_victim)) == 2
    assert tally.redelivered == 1, tally
    assert child_wait < 5.0
    assert reversals(actions) <= 1, actions


def test_leader_failover(rig: Rig, fault_report: Report) -> None:
    leader = rig.start_controller()
    _ready(rig)
    standby = rig.start_controller()
    wait_until(lambda: standby.first("is now a standby") or None, timeout=30,
               what="the second controller to stand by")
    rig.publish(BURST, SECONDS)
    _scaled_up(rig)
    leader.kill(signal.SIGSTOP)
    stopped = time.monotonic()
    took_over = wait_until(lambda: standby.first("is now the leader", after=stopped), timeout=30,
                           what="the takeover")
    tally = rig.wait_all_done(180)
    leader.kill(signal.SIGCONT)
    _back_down(rig)
    time.sleep(3)
    after_resume = [a for a in leader.actions() if a[0] > took_over[0]]
    actions = leader.actions() + standby.actions()
    fault_report.add(
        "leader SIGSTOPped past its lease, then resumed", tally, actions=len(actions),
        reversals=reversals(sorted(actions)), recover_s=took_over[0] - stopped,
        operator_saw=(leader.first("lost the leader lease|is now a standby", after=stopped) or (0, "-"))[1],
    )
    _check(tally)
    assert not after_resume, f"the resumed old leader acted: {after_resume}"
    assert took_over[0] - stopped < 5.0


def _replace(path: Path, text: str) -> None:
    """Write as an editor that saves in place would leave it at one instant (no empty file in between)."""
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    os.replace(partial, path)


def test_policy_corrupted_live(rig: Rig, fault_report: Report) -> None:
    controller = rig.start_controller()
    _ready(rig)
    good = rig.policy.read_text()
    rig.publish(BURST, SECONDS)
    _scaled_up(rig)
    edited = time.monotonic()
    _replace(rig.policy, good[: len(good) // 2])  # truncated mid-write
    wait_until(lambda: controller.first("is invalid; keeping the last good policy", after=edited) or None,
               timeout=15, what="the truncated policy to be reported")
    time.sleep(3)
    _replace(rig.policy, "pools: [unclosed\n")  # not YAML at all
    time.sleep(3)
    fixed = time.monotonic()
    _replace(rig.policy, good.replace("max: 4", "max: 3").replace("replicas: 4", "replicas: 3"))  # a valid edit
    applied = wait_until(lambda: controller.first("reloaded", after=fixed), timeout=15,
                         what="the valid edit to be applied")
    wait_until(lambda: rig.running() <= 3 or None, timeout=90, what="the new max in force", interval=0.5)
    tally = rig.wait_all_done(180)
    _back_down(rig)
    after = [line for t, line in controller.lines if t >= edited]
    refusals = [n for n, line in enumerate(after) if "is invalid; keeping the last good policy" in line]
    located = [after[n + 1].strip() for n in refusals if n + 1 < len(after)]
    actions = controller.actions()
    fault_report.add(
        "policy truncated, then invalid YAML, then a valid edit", tally, actions=len(actions),
        reversals=reversals(actions), recover_s=applied[0] - fixed,
        operator_saw=" / ".join(located) or "-",
    )
    _check(tally)
    assert len(refusals) == 2, after  # each bad version once, not once per tick
    assert all(f"{rig.policy}:" in line for line in located), located
    assert applied[0] - fixed < 2.5  # the next tick (interval 1 s)
    assert reversals(actions) <= 1, actions
