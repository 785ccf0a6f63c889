"""Real faults during a real burst: every published task completes (once, or redelivered), none is lost.

Each case runs the fault suite's app (tests/docker/compose/faults.yaml: a broker with AOF, real Celery
workers with late acks, reject-on-worker-lost and prefetch 1) under an `autoscaler run` process, publishes a
burst that takes the pool 1 -> 4 and back, breaks something in the middle, and then accounts for every task
by id in a ledger Redis that no fault touches. It also counts the controller's actions: a burst needs one
scale-up and at most two scale-downs (4 -> 2 -> 1); a fault may add the actions that repair it, but the
direction may change only once (no flapping). The faults: Redis restarted, the controller SIGKILLed
mid-scale-up and mid-drain, a worker's pool child SIGKILLed mid-task, a worker container SIGKILLed
mid-task, the leader SIGSTOPped past its lease, the policy file corrupted live, the broker filling up, and
dockerd restarted mid-scale-up (only where .ci/run opts in: it stops every container on the machine). The table at the
end of the run (conftest.py) is the README's reliability table.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis
from docker.models.containers import Container
from dockertest import wait_until
from engine import PID_FILE, SOCKET, daemon_serving
from rig import Report, Rig, Tally, reversals

from autoscaler.publish_guard import PublishGuard

REPO = Path(__file__).resolve().parents[3]

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.faults, pytest.mark.timeout(420)]

BURST, SECONDS = 20, 1.0
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
    tally = rig.wait_all_done(180)
    # Looked for only now: the first failed read may end (its connects time out) after Redis is back.
    saw = controller.first("metric unavailable", after=stopped)
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
    assert len(rig.project.containers("worker")) <= 4
    assert reversals(actions) <= 1, actions


def _burst_and_a_long_task(rig: Rig) -> tuple[str, Container, int]:
    """The burst, and behind it one longer task: its id, and the container and pid running it once it runs.

    The long task is still shorter than the visibility timeout (10 s): a longer one is delivered again while
    it still runs.
    """
    rig.start_controller()
    _ready(rig)
    rig.publish(BURST, SECONDS)
    (task_id,) = rig.publish(1, 6.0)
    _scaled_up(rig)
    first = wait_until(lambda: next(iter(rig.deliveries(task_id)), None), timeout=90, what="the long task to start",
                       interval=0.1)
    return task_id, next(c for c in rig.project.containers("worker") if c.id.startswith(first.host)), first.pid


def test_worker_pool_child_killed_mid_task(rig: Rig, fault_report: Report) -> None:
    # The prefork child running the long task dies with SIGKILL: reject_on_worker_lost requeues it at once.
    child_victim, container, pid = _burst_and_a_long_task(rig)
    controller = rig.controllers[0]
    killed = time.monotonic()
    code, out = container.exec_run(["python", "-c", f"import os; os.kill({pid}, 9)"])
    assert code == 0, out
    wait_until(lambda: len(rig.deliveries(child_victim)) >= 2 or None, timeout=60, what="the redelivery", interval=0.1)
    child_wait = time.monotonic() - killed
    tally = rig.wait_all_done(180)
    _back_down(rig)
    actions = controller.actions()
    fault_report.add(
        "worker's pool child SIGKILLed mid-task", tally, actions=len(actions),
        reversals=reversals(actions), recover_s=child_wait,
        operator_saw=f"the task ran again {child_wait:.1f} s after its child was killed (ledger: 2 deliveries)",
    )
    _check(tally)
    assert len(rig.deliveries(child_victim)) == 2
    assert tally.redelivered == 1, tally
    # Requeued by the worker itself, not restored after the visibility timeout (10 s) as a lost one is.
    assert child_wait < 10.0
    assert reversals(actions) <= 1, actions


def test_worker_container_killed_mid_task(rig: Rig, fault_report: Report) -> None:
    """A killed container cannot reject its task: the task waits out the visibility timeout (10 s here)."""
    victim, container, _ = _burst_and_a_long_task(rig)
    controller = rig.controllers[0]
    killed = time.monotonic()
    container.kill()
    wait_until(lambda: len(rig.deliveries(victim)) >= 2 or None, timeout=120, what="the killed container's task back",
               interval=0.2)
    waited = time.monotonic() - killed
    tally = rig.wait_all_done(180)
    _back_down(rig)
    actions = controller.actions()
    fault_report.add(
        "a worker container SIGKILLed mid-task", tally, actions=len(actions), reversals=reversals(actions),
        recover_s=waited,
        operator_saw=f"the task ran again {waited:.1f} s after the kill (the visibility timeout)",
    )
    _check(tally)
    assert len(rig.deliveries(victim)) == 2
    first, second = (delivery.at for delivery in rig.deliveries(victim))
    # Back by the visibility timeout (10 s from its delivery; the broker looks every second), not at once.
    assert 9.0 <= second - first < 40, (first, second)
    assert reversals(actions) <= 1, actions


def test_leader_failover(rig: Rig, fault_report: Report) -> None:
    leader = rig.start_controller()
    _ready(rig)
    standby = rig.start_controller()
    wait_until(lambda: standby.first("is now a standby") or None, timeout=30,
               what="the second controller to stand by")
    rig.publish(BURST, SECONDS)
    _scaled_up(rig)
    # The engine shows the replicas before the leader logs its action: stopped in between, the line would
    # be read after SIGCONT and taken for an action of the resumed leader.
    wait_until(lambda: leader.first(r"scaled fast from \d+ to 4") or None, timeout=30,
               what="the leader to report its scale-up")
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


def test_redis_full_publishing_stops_before_the_broker_does(rig: Rig, fault_report: Report) -> None:
    """At maxmemory kombu loses the message a worker pops; publishing stops at 80 % so it never gets there."""
    controller = rig.start_controller()
    _ready(rig)
    broker = redis.Redis.from_url(rig.broker_url)
    maximum = int(broker.info("memory")["used_memory"]) + 6 * 2**20
    broker.config_set("maxmemory-policy", "noeviction")
    broker.config_set("maxmemory", maximum)
    peak = [0]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            with contextlib.suppress(redis.RedisError):
                peak[0] = max(peak[0], int(broker.info("memory")["used_memory"]))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    guard = PublishGuard(broker, limit=0.8, ttl=0.0)
    padding = "x" * 50_000
    refused, first_refusal = 0, ""
    try:
        # Producers keep trying: each try is published unless the guard refuses it (a 503 to the client).
        deadline = time.monotonic() + 60
        while refused < 30 and time.monotonic() < deadline:
            reason = guard.refusal()
            if reason is not None:
                refused += 1
                first_refusal = first_refusal or reason
                time.sleep(0.05)
                continue
            rig.publish(1, 0.5, padding)
        _scaled_up(rig)
        tally = rig.wait_all_done(180)
        _back_down(rig)
    finally:
        sampling.set()
        sampler.join(timeout=5)
        broker.config_set("maxmemory", 0)
        broker.close()
    actions = controller.actions()
    fault_report.add(
        f"Redis full: producers keep publishing ({refused} tries refused)", tally, actions=len(actions),
        reversals=reversals(actions), recover_s=None,
        operator_saw=f"503 {first_refusal[:90]}; broker peak {peak[0] / maximum:.0%} of maxmemory",
    )
    _check(tally)
    assert refused >= 1, "the burst never reached the limit: the case proves nothing"
    assert tally.published >= 40, tally
    assert peak[0] < maximum, f"the broker reached maxmemory ({peak[0]} of {maximum})"
    assert reversals(actions) <= 1, actions


def _engine_answers() -> bool:
    # The CLI, not docker-py: a client of this process that fails to connect leaves a socket behind, which
    # pytest reports as an unraisable exception in a later test.
    return subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=30).returncode == 0


@pytest.mark.skipif(
    os.environ.get("AUTOSCALER_FAULTS_RESTART_DOCKERD") != "1" or os.geteuid() != 0,
    reason="opt-in: stops this machine's dockerd (every container on it); .ci/run sets "
    "AUTOSCALER_FAULTS_RESTART_DOCKERD=1 (as root)",
)
def test_dockerd_restarts_mid_scale_up(rig: Rig, fault_report: Report) -> None:
    """The engine goes away for ~20 s as the pool scales up: the pool holds, says why, and resumes."""
    controller = rig.start_controller()
    _ready(rig)
    rig.publish(BURST, SECONDS)
    wait_until(lambda: len(rig.project.containers("worker")) > 1 or None, timeout=60,
               what="the scale-up to begin", interval=0.1)
    # Only the daemon this engine's socket belongs to: another dockerd on the machine is not ours to stop.
    pid = daemon_serving()
    assert pid is not None, f"cannot tell which dockerd serves {SOCKET} (by {PID_FILE}): not stopping any"
    stopped = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not Path(f"/proc/{pid}").exists() or None, timeout=90, what="dockerd to exit")
        # The engine's containers stop with it, the broker among them: the first thing the controller cannot
        # reach may be either, and it holds for both.
        saw = wait_until(
            lambda: controller.first("cannot reach the Docker daemon|cannot reach Redis", after=stopped),
            timeout=60, what="the controller to say what it cannot reach",
        )
        time.sleep(max(0.0, 20 - (time.monotonic() - stopped)))
    finally:
        # Back the way CI started it: the project's own script (in the background, not as a child of this
        # test), whatever happened above: every later test needs the engine.
        subprocess.run(["bash", str(REPO / "scripts" / "docker-up.sh")], check=True, capture_output=True,
                       timeout=240)
        wait_until(lambda: _engine_answers() or None, timeout=120, what="dockerd to answer again", interval=1)
    back = time.monotonic()
    recovered = wait_until(lambda: controller.first(r"pool fast current=\d+ desired=\d+", after=back),
                           timeout=120, what="the controller's first decision with the engine back")
    # Longer than kombu's unacked_mutex_expire (300 s). A full run once timed out here at 300 s with the
    # queue empty (a rerun passed in 40 s); the likely cause: a worker stopped with the engine while holding
    # the broker's unacked-restore mutex (persisted by AOF) keeps every worker from restoring the in-flight
    # task until that mutex expires.
    tally = rig.wait_all_done(420)
    _back_down(rig, timeout=240)
    states = [c.status for c in rig.project.containers("worker")]
    actions = controller.actions()
    fault_report.add(
        "dockerd stopped ~20 s mid-scale-up, then started", tally, actions=len(actions),
        reversals=reversals(actions), recover_s=recovered[0] - back, operator_saw=saw[1],
    )
    _check(tally)
    assert states.count("running") == 1 and len(states) <= 2, states  # at most one never-started clone left
    assert reversals(actions) <= 1, actions
