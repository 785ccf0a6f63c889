"""A controller killed mid-drain: the next one takes the stops over (Trust boundaries I, defects 3 and 4).

The draining set lived in process memory, so a controller restarted while victims were in their warm
shutdown counted them as running capacity (`current=9` while 5 were stopping) and could choose the
survivors as new victims; and victims that exited after the crash were never removed. Now the draining
ids and their deadlines are in the pool's state in Redis: the next leader resumes those stops (never
counting the victims), removes them once stopped, and ignores marks that name containers that are not
the pool's own (a broker client can write that state). A controller that exits mid-drain (SIGTERM, or
`--once`) does not wait for the stops: the daemon finishes them, and the next leader removes the victims.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import redis
from dockertest import start_controller, wait_until

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
    min: 1
    max: 5
    tiers: [{{above: 100, replicas: 5}}, {{below: 10, replicas: 1}}]
    cooldown: {{up: 0s, down: 0s}}
    stabilization: 0s
    stop_timeout: 40s
"""


def test_a_controller_killed_mid_drain_leaves_the_next_one_to_finish_it(
    compose_project: ProjectFactory, redis_url: str, tmp_path: Path
) -> None:
    project = compose_project("slowstop.yaml", "worker", tag="drain")
    assert len(project.running_ids("worker")) == 3
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(project=project.name))
    state = redis.Redis.from_url(redis_url)

    first = start_controller(policy, redis_url)
    try:
        # It scales 3 -> 1; the two victims ignore SIGTERM, so their stops take the 40 s grace.
        marks = wait_until(
            lambda: (raw := state.get("autoscaler:state:fast")) and json.loads(raw).get("draining"),
            timeout=60, what="the draining marks in the pool's state",
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)  # reaps it and closes its pipe
    assert len(marks) == 2, marks
    # The dead leader's lease runs out (1.5 intervals) before the next controller may lead.
    wait_until(lambda: not state.exists("autoscaler:leader"), timeout=30, what="the dead leader's lease to end")
    victims = {cid for cid, _ in marks}
    assert victims <= project.running_ids("worker"), "the victims should still be in their warm shutdown"

    # A forged mark naming a container that is not the pool's (another project's) is ignored.
    other = project.client.containers.run(project.containers("worker")[0].image.id, ["-c", "import time; "
                                          "time.sleep(600)"], entrypoint=["python"], detach=True)
    try:
        doc = json.loads(state.get("autoscaler:state:fast") or b"{}")
        doc["draining"].append([other.id, time.time() + 5])
        state.set("autoscaler:state:fast", json.dumps(doc))

        second = start_controller(policy, redis_url, "--once")
        out, _ = second.communicate(timeout=120)
        assert second.returncode == 0, out
        decisions = [line for line in out.splitlines() if "pool fast current=" in line]
        assert decisions and "pool fast current=1 desired=1" in decisions[0], out
        assert "resuming the drain" in out, out
        other.reload()
        assert other.status == "running", "a forged draining mark stopped a container the pool does not own"
    finally:
        other.remove(force=True)

    # The second controller exited without waiting for the resumed stops (issue 17, item 10): the daemon ends
    # them at the grace (SIGKILL: the victims ignore SIGTERM) and the marks stay in the state, so the next
    # leader removes the victims; the survivor stays.
    wait_until(lambda: not victims & project.running_ids("worker"), timeout=90, what="the victims to exit",
               interval=1)
    assert {cid for cid, _ in json.loads(state.get("autoscaler:state:fast") or b"{}")["draining"]} == victims
    third = start_controller(policy, redis_url, "--once")
    out, _ = third.communicate(timeout=120)
    assert third.returncode == 0, out
    pool = PoolPolicy.model_validate({
        "name": "fast", "target": {"compose": {"service": "worker", "project": project.name}}, "queues": ["fast"],
        "min": 1, "max": 5, "tiers": [{"below": 10, "replicas": 1}],
    })
    backend = ComposeBackend(docker_connection=DockerConnection())
    try:
        wait_until(lambda: not victims & {c.id for c in project.containers("worker")}, timeout=30,
                   what="the victims to be removed", interval=1)
        assert backend.status(pool).running == 1
    finally:
        backend.close()
        state.close()
