"""Only the leader acts: the lease is re-checked before every Docker call and state write, a replica that
takes the lock (again) re-reads the stored state, and the lease's expiry follows the policy's interval
(Trust boundaries II, defect 1). Real Redis; the backend is in memory but fenced like the Docker one."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from autoscaler.backends.base import BackendError, LeaseLostError, TargetStatus
from autoscaler.backends.compose import ComposeBackend
from autoscaler.backends.docker_client import DockerConnection
from autoscaler.backends.memory import MemoryBackend
from autoscaler.backends.swarm_drain import SwarmDrainer
from autoscaler.inflight import ActionsInFlight
from autoscaler.leader import Fence, LeaderLock, Lease
from autoscaler.loop import Controller
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.model import BrokerOptions, PoolPolicy
from autoscaler.policy.watch import PolicyWatcher
from autoscaler.settings import Settings
from autoscaler.sources.celery_redis import CeleryRedisSource
from autoscaler.state_store import RedisStateStore, StateFencedError
from autoscaler.types import PoolState
from autoscaler.wiring import lease_problems, lease_ttl
from tests.test_loop import POLICY, Clock, publish

pytestmark = pytest.mark.redis


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


class FencedBackend(MemoryBackend):
    """MemoryBackend whose every call first checks the fence, as `DockerConnection.call` does; `status`
    can be made slow (a Docker tick that outlasts the lease)."""

    def __init__(self, replicas: dict[str, int], fence: Fence, *, slow_status: float = 0.0) -> None:
        super().__init__(replicas)
        self.fence = fence
        self.slow_status = slow_status

    def status(self, pool: PoolPolicy) -> TargetStatus:
        self.fence.check(f"list the containers of {pool.target.service}")
        time.sleep(self.slow_status)
        return super().status(pool)

    def scale(self, pool: PoolPolicy, *, current: int, desired: int) -> None:
        self.fence.check(f"scale {pool.target.service}")
        super().scale(pool, current=current, desired=desired)


def controller(url: str, policy: Path, backend: MemoryBackend, lock: LeaderLock, fence: Fence,
               clock: Clock) -> Controller:
    return Controller(
        policies=PolicyWatcher(policy), source=CeleryRedisSource(url=url, broker=BrokerOptions()),
        backend=backend, store=RedisStateStore(redis.Redis.from_url(url), prefix="autoscaler:"),
        metrics=Metrics(), lock=lock, fence=fence, clock=clock,
    )


def lock(url: str, name: str, ttl: float) -> LeaderLock:
    return LeaderLock(redis.Redis.from_url(url), key="autoscaler:leader", instance_id=name, ttl=ttl)


def test_a_leader_whose_lease_lapses_mid_tick_makes_no_further_call_nor_state_write(
    redis_url: str, policy_file: Path, logs: list[str]
) -> None:
    publish(redis_url, "fast", 600)
    lock_a, lock_b = lock(redis_url, "a", 0.3), lock(redis_url, "b", 0.3)
    fence_a = Fence(lock_a)
    backend = FencedBackend({"worker-fast": 2, "worker-io": 2}, fence_a, slow_status=0.5)
    a = controller(redis_url, policy_file, backend, lock_a, fence_a, Clock())
    # While a's first Docker call is slow, its lease expires and b takes the lock.
    taker = threading.Timer(0.4, lock_b.acquire_or_renew)
    taker.start()
    report = a.tick()
    taker.join()
    assert lock_b.holder() == "b"
    assert backend.actions == [], "a acted after losing its lease"
    fast = report.pools[0]
    assert fast.action is not None and not fast.action.ok and "lost the leader lease" in (fast.action.error or "")
    assert redis.Redis.from_url(redis_url).get("autoscaler:state:fast") is None, "a wrote the state"
    assert a.states is None  # what it held is stale: re-read if it ever leads again
    assert sum(line.startswith("lost the leader lease before") for line in logs) == 1  # said once, as a warning
    # Its next tick finds b holding the lock: a standby, no call at all.
    backend.slow_status = 0.0
    assert a.tick().role == "standby" and backend.actions == []


def test_a_replica_that_takes_the_lock_back_reads_the_state_the_other_left(
    redis_url: str, policy_file: Path, logs: list[str]
) -> None:
    """A scaled 2 -> 5, lost its lease, B scaled 5 -> 10; when A leads again it must know B's scale-up."""
    clock = Clock()
    replicas = {"worker-fast": 2, "worker-io": 2}
    lock_a, lock_b = lock(redis_url, "a", 0.3), lock(redis_url, "b", 0.3)
    fence_a, fence_b = Fence(lock_a), Fence(lock_b)
    backend_a, backend_b = FencedBackend(replicas, fence_a), FencedBackend(replicas, fence_b)
    backend_b.replicas = backend_a.replicas  # one engine
    a = controller(redis_url, policy_file, backend_a, lock_a, fence_a, clock)
    b = controller(redis_url, policy_file, backend_b, lock_b, fence_b, clock)
    publish(redis_url, "fast", 150)
    assert a.tick().pools[0].decision.desired == 5
    time.sleep(0.4)  # a is paused past its lease
    clock.now += 40
    publish(redis_url, "fast", 500)
    report = b.tick()
    assert report.role == "leader" and report.pools[0].decision.desired == 10
    time.sleep(0.4)  # now b is gone
    clock.now += 5
    assert a.tick().role == "leader"
    assert a.states is not None and a.states["fast"].last_scale_up == clock.now - 5, "a kept its stale state"
    assert any("had lapsed" in line for line in logs)


def test_docker_calls_are_fenced_before_every_attempt(redis_url: str) -> None:
    lock_a, lock_b = lock(redis_url, "a", 0.2), lock(redis_url, "b", 5)
    fence = Fence(lock_a)
    connection = DockerConnection(base_url="unix:///nonexistent/docker.sock", fence=fence.check)
    called: list[str] = []
    assert lock_a.acquire_or_renew() is Lease.ACQUIRED
    time.sleep(0.3)
    assert lock_b.acquire_or_renew() is Lease.ACQUIRED
    with pytest.raises(LeaseLostError, match="lost the leader lease"):
        connection.call("create container x", lambda client: called.append("create"))
    assert called == []
    assert fence.lost == "create container x"


def test_a_lease_that_cannot_be_confirmed_is_not_acted_on(redis_url: str) -> None:
    """In a partition another replica may take the lock: a lease this one cannot confirm is lost (fail closed)."""
    lease = LeaderLock(redis.Redis(port=1, socket_connect_timeout=0.2), key="autoscaler:leader", instance_id="a",
                       ttl=60)
    fence = Fence(lease)
    with pytest.raises(LeaseLostError):
        fence.check("create container x")


def test_the_lease_follows_the_interval_through_reloads(redis_url: str, policy_file: Path) -> None:
    settings = Settings(redis_url=redis_url, policy=str(policy_file))
    client = redis.Redis.from_url(redis_url)
    lease = LeaderLock(client, key="autoscaler:leader", instance_id="a", ttl=1)
    fence = Fence(lease)
    a = controller(redis_url, policy_file, FencedBackend({"worker-fast": 2, "worker-io": 2}, fence), lease, fence,
                   Clock())
    a.lease_ttl = lambda p: lease_ttl(settings, p)
    a.tick()
    assert 1000 < client.pttl("autoscaler:leader") <= 1500
    policy_file.write_text(POLICY.replace("interval: 1s", "interval: 60s"))
    a.tick()
    assert 60_000 < client.pttl("autoscaler:leader") <= 90_000


def test_an_explicit_ttl_not_above_the_interval_is_refused(policy_file: Path) -> None:
    watcher = PolicyWatcher(policy_file, check=lambda p: lease_problems(Settings(leader_ttl=45), p))
    assert lease_problems(Settings(leader_ttl=45), watcher.policy) == []  # interval 1s
    assert lease_problems(Settings(leader_ttl=1), watcher.policy)  # equal: refused
    policy_file.write_text(POLICY.replace("interval: 1s", "interval: 60s"))
    policy, event = watcher.poll()
    assert event == "invalid" and policy.interval == 1.0
    assert watcher.last_errors == [
        f"{policy_file}:2: interval: 60s is not below AUTOSCALER_LEADER_TTL=45s: the leader lock would expire "
        "between two renewals and two replicas would take turns leading (unset AUTOSCALER_LEADER_TTL to have "
        "it follow the interval)"
    ]


def test_run_refuses_an_explicit_ttl_not_above_the_interval_at_start(policy_file: Path, redis_url: str) -> None:
    env = {**os.environ, "AUTOSCALER_LEADER_TTL": "1", "AUTOSCALER_REDIS_URL": redis_url,
           "AUTOSCALER_METRICS_PORT": "0"}
    proc = subprocess.run([sys.executable, "-m", "autoscaler.cli", "run", "--once", "--policy", str(policy_file)],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "settings: interval: 1s is not below AUTOSCALER_LEADER_TTL=1s" in proc.stderr


def test_the_state_is_written_only_while_the_lock_is_this_replicas(redis_url: str) -> None:
    """The write and the lease check are one step (review): no gap for a paused leader to overwrite."""
    client = redis.Redis.from_url(redis_url)
    store = RedisStateStore(client, prefix="autoscaler:", lease=("autoscaler:leader", "a"))
    client.set("autoscaler:leader", "b")
    with pytest.raises(StateFencedError):
        store.save({"fast": PoolState(last_scale_up=1.0)})
    assert client.get("autoscaler:state:fast") is None
    client.set("autoscaler:leader", "a")
    store.save({"fast": PoolState(last_scale_up=1.0)})
    assert store.load(["fast"])["fast"].last_scale_up == 1.0


@pytest.mark.parametrize("backend_kind", ["compose", "swarm"])
def test_the_lease_is_renewed_before_the_busy_worker_probe_waits(redis_url: str, backend_kind: str) -> None:
    """The busy-worker probe waits out its whole timeout (about a second at the default) between two lease
    checks: unrenewed before it, a 1 s interval's 1.5 s lease lapsed by the stop that follows (a review of the
    fault suite), the stop was refused and the scale-down repeated at the next tick. Here: a 1 s lease, 0.6 s
    of the tick before the probe, a 0.7 s probe, then the stop's check."""
    leader = lock(redis_url, "a", 1.0)
    fence = Fence(leader)
    pool = PoolPolicy.model_validate({
        "name": "fast", "queues": ["fast"], "min": 1, "max": 4, "tiers": [{"above": 100, "replicas": 4}],
        "target": {backend_kind: {"service": "worker"}},
    })

    def slow_probe(_pool: PoolPolicy, *, hosts: object = None) -> set[str]:
        time.sleep(0.7)
        return set()

    assert leader.acquire_or_renew() is Lease.ACQUIRED
    time.sleep(0.6)  # the tick's listing and decision since the lease was last renewed
    if backend_kind == "compose":
        backend = ComposeBackend(docker_connection=DockerConnection(fence=fence.check), busy_probe=slow_probe)
        backend._busy(pool)
        backend.close()
    else:
        class SlowControl:
            def workers(self, _pool: PoolPolicy, *, hosts: object = None) -> dict[str, bool]:
                slow_probe(_pool)
                return {}

            def shutdown(self, nodenames: list[str]) -> None:
                raise AssertionError("no worker to shut down")

        running = [{"ID": f"t{n}", "DesiredState": "running", "Status": {"State": "running"}} for n in (1, 2)]
        drainer = SwarmDrainer(control=SlowControl(), list_tasks=lambda _service: running,
                               set_replicas=lambda _pool, _count: None, fence=fence.check)
        drainer.begin(pool, {"ID": "svc", "Spec": {}}, running, desired=1)
        drainer.close()
    fence.check("stop container worker_4")  # raised LeaseLostError when the probe came unrenewed
    assert fence.lost is None


class ResumeFailsOnce(MemoryBackend):
    """A daemon that does not answer the new leader's first look at the drains it takes over."""

    def __init__(self, replicas: dict[str, int]) -> None:
        super().__init__(replicas)
        self.resumed: list[tuple[str, tuple[tuple[str, float], ...]]] = []

    def resume_drains(self, pool: PoolPolicy, marks: tuple[tuple[str, float], ...]) -> None:
        if not self.resumed:
            self.resumed.append(("failed", marks))
            raise BackendError("cannot reach the Docker daemon (restarting)")
        self.resumed.append((pool.name, marks))


def test_drains_a_new_leader_cannot_resume_yet_stay_in_the_state(redis_url: str, policy_file: Path) -> None:
    """The marks another leader left are the only record of its stops under way: one failed resume must not
    overwrite them with nothing; the next tick tries again."""
    marks = (("0123456789ab" * 5 + "0123", 2_000_000.0),)
    store = RedisStateStore(redis.Redis.from_url(redis_url), prefix="autoscaler:")
    store.save({"fast": PoolState(draining=marks)})
    backend = ResumeFailsOnce({"worker-fast": 3, "worker-io": 2})
    new_leader = Controller(
        policies=PolicyWatcher(policy_file), source=CeleryRedisSource(url=redis_url, broker=BrokerOptions()),
        backend=backend, store=store, metrics=Metrics(), clock=Clock(),
    )
    new_leader.tick()
    assert store.load(["fast"])["fast"].draining == marks
    new_leader.tick()
    assert backend.resumed == [("failed", marks), ("fast", marks)]


class GatedBackend(FencedBackend):
    """Scripted: the first scale blocks until the test lets it go (a create in flight), then checks the fence as
    the Docker backend does before its next call."""

    def __init__(self, replicas: dict[str, int], fence: Fence) -> None:
        super().__init__(replicas, fence)
        self.gate, self.blocked = threading.Event(), threading.Event()

    def scale(self, pool: PoolPolicy, *, current: int, desired: int) -> None:
        if not self.blocked.is_set():
            self.blocked.set()
            assert self.gate.wait(60)
        super().scale(pool, current=current, desired=desired)


def test_an_action_begun_under_a_lease_lost_and_taken_again_neither_acts_nor_writes(
    redis_url: str, policy_file: Path
) -> None:
    """A's action (2 -> 10) is in flight when its lease lapses; B leads, finds the queue drained and writes its
    state; B's lease lapses and A takes the lock again (re-armed fence, reloaded state). A's old action must
    not carry out the decision made before B led nor write its state over B's; A's next action works."""
    client = redis.Redis.from_url(redis_url)
    clock = Clock()
    lock_a, lock_b = lock(redis_url, "a", 30.0), lock(redis_url, "b", 30.0)
    fence_a, fence_b = Fence(lock_a), Fence(lock_b)
    backend_a = GatedBackend({"worker-fast": 2, "worker-io": 2}, fence_a)
    backend_b = FencedBackend({}, fence_b)
    backend_b.replicas = backend_a.replicas  # one engine
    a = controller(redis_url, policy_file, backend_a, lock_a, fence_a, clock)
    a.actions = ActionsInFlight()
    b = controller(redis_url, policy_file, backend_b, lock_b, fence_b, clock)
    publish(redis_url, "fast", 600)
    assert a.tick().pools[0].decision.desired == 10
    assert backend_a.blocked.wait(60)  # A's scale-up is in flight
    client.delete("autoscaler:leader", "fast")  # A's lease lapses (A is paused); the queue drains
    clock.now += 40
    assert b.tick().role == "leader"
    b_state = client.get("autoscaler:state:fast")
    assert b_state is not None and backend_a.replicas["worker-fast"] == 2
    client.delete("autoscaler:leader")  # B stops; A takes the lock again
    clock.now += 5
    assert a.tick().role == "leader" and lock_a.term == 2
    backend_a.gate.set()
    assert a.actions.wait(60)
    assert backend_a.actions == [], "A's action from before B led went on after A took the lock again"
    assert client.get("autoscaler:state:fast") == b_state, "A's stale action wrote its state over B's"
    # An action of the new term acts and records its state as usual.
    publish(redis_url, "fast", 600)
    clock.now += 40
    assert a.tick().pools[0].decision.desired == 10
    assert a.actions.wait(60)
    assert backend_a.actions == [("fast", 2, 10)]
    assert a.store.load(["fast"])["fast"].target == 10


def test_fence_checks_bound_to_a_term_fail_once_the_lock_was_taken_again(redis_url: str) -> None:
    """Only the checks made within the old term's `acting_under` fail: the new term's work (the tick, a fresh
    action, a thread started elsewhere) is not fenced off, and the fence is not marked lost."""
    the_lock = lock(redis_url, "a", 30.0)
    fence = Fence(the_lock)
    assert the_lock.acquire_or_renew() is Lease.ACQUIRED
    old = fence.term()
    with fence.acting_under(old):
        fence.check("a call of the first term")
        redis.Redis.from_url(redis_url).delete("autoscaler:leader")  # lapsed; another replica may have led
        assert the_lock.acquire_or_renew() is Lease.ACQUIRED
        with pytest.raises(LeaseLostError, match="earlier leader lease"):
            fence.check("a call of the first term, now stale")
        assert fence.stale()
        with fence.acting_under(fence.term()):
            fence.check("a call of the new term, nested")
    assert fence.lost is None and not fence.stale()
    fence.check("the new term's tick")
    seen: list[bool] = []
    with fence.acting_under(old):
        outside = threading.Thread(target=lambda: seen.append(fence.stale()))  # threads do not inherit it
        outside.start()
        outside.join()
    assert seen == [False]
