"""Controller state in a real Redis: per-pool state, the leader lock, and the policy watcher."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoscaler.leader import LeaderLock, Lease
from autoscaler.observability.http import HealthServer
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.watch import PolicyWatcher
from autoscaler.settings import Settings, default_instance_id
from autoscaler.state_store import RedisStateStore
from autoscaler.types import PoolState
from autoscaler.wiring import build_controller

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.redis


def test_state_round_trips_through_redis(redis_url: str) -> None:
    """Saved pool states read back identical; pools never saved start fresh."""
    client = redis.Redis.from_url(redis_url)
    store = RedisStateStore(client, prefix="t:")
    state = PoolState(last_scale_up=10.0, recommendations=((1.0, 2), (2.0, 5)), consecutive_failures=1)
    store.save({"fast": state})
    assert store.load(["fast", "cpu"]) == {"fast": state, "cpu": PoolState()}


def test_malformed_state_starts_fresh(redis_url: str) -> None:
    """A corrupted state record does not stop the controller: that pool starts fresh."""
    client = redis.Redis.from_url(redis_url)
    client.set("t:state:fast", "{not json")
    client.set("t:state:cpu", json.dumps({"recommendations": [["x", 1]]}))
    assert RedisStateStore(client, prefix="t:").load(["fast", "cpu"]) == {"fast": PoolState(), "cpu": PoolState()}


def test_only_one_leader_and_takeover_after_expiry(redis_url: str) -> None:
    """Two replicas never both hold the lock; a standby takes over once the leader stops renewing."""
    client = redis.Redis.from_url(redis_url)
    # A lease of 1 s renewed after 0.3 s: slack for a loaded CI machine (0.3 s with 0.2 s of sleep was thin).
    a = LeaderLock(client, key="t:leader", instance_id="a", ttl=1.0)
    b = LeaderLock(client, key="t:leader", instance_id="b", ttl=1.0)
    assert (a.acquire_or_renew(), b.acquire_or_renew()) == (Lease.ACQUIRED, Lease.HELD_BY_OTHER)
    time.sleep(0.3)
    assert (a.acquire_or_renew(), b.acquire_or_renew()) == (Lease.RENEWED, Lease.HELD_BY_OTHER)  # still a's
    time.sleep(1.1)  # a "dies": no renewal past the ttl
    assert b.acquire_or_renew() is Lease.ACQUIRED
    assert a.acquire_or_renew() is Lease.HELD_BY_OTHER  # the old leader must not steal it back
    assert a.holder() == "b"


def test_default_instance_ids_are_unique_per_process(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two controllers in containers of one name both run as pid 1: their default ids must still differ, or
    both hold the lock (each renews the other's lease) and both act, unfenced."""
    monkeypatch.delenv("AUTOSCALER_INSTANCE_ID", raising=False)
    monkeypatch.setattr(socket, "gethostname", lambda: "autoscaler")
    monkeypatch.setattr(os, "getpid", lambda: 1)
    client = redis.Redis.from_url(redis_url)
    a, b = (LeaderLock(client, key="t:leader", instance_id=Settings().instance_id, ttl=60) for _ in range(2))
    assert (a.acquire_or_renew(), b.acquire_or_renew()) == (Lease.ACQUIRED, Lease.HELD_BY_OTHER)
    assert (a.acquire_or_renew(), b.acquire_or_renew()) == (Lease.RENEWED, Lease.HELD_BY_OTHER)
    assert a.instance_id.startswith("autoscaler:1:"), "the host and pid stay readable in the id"


def test_an_empty_instance_id_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """`AUTOSCALER_INSTANCE_ID=` (set but empty, as Compose's `${VAR:-}` gives) would name every such replica
    alike: it means "not set", as for the other settings."""
    monkeypatch.setenv("AUTOSCALER_INSTANCE_ID", " ")
    assert Settings().instance_id.strip()
    monkeypatch.setenv("AUTOSCALER_INSTANCE_ID", "web-1")
    assert Settings().instance_id == "web-1"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.binary(max_size=64) | st.text(max_size=40).map(str.encode))
def test_a_lock_value_any_client_writes_never_counts_as_ours(redis_url: str, value: bytes) -> None:
    """When the lock shares the broker, any client can write its key: whatever bytes it holds, reading it never
    raises, and only our exact id is ours (a written value that is not is a lease that expires)."""
    client = redis.Redis.from_url(redis_url)
    ours = default_instance_id()
    lock = LeaderLock(client, key="t:hostile-leader", instance_id=ours, ttl=60)
    client.set(lock.key, value)
    assert isinstance(lock.holder(), str)
    if value == ours.encode():
        assert lock.acquire_or_renew() is Lease.RENEWED and lock.confirm()
    else:
        assert lock.acquire_or_renew() is Lease.HELD_BY_OTHER and not lock.confirm()
        assert 0 < int(client.pttl(lock.key)) <= 120_000
    client.delete(lock.key)


def test_release_hands_over_at_once(redis_url: str) -> None:
    """A leader that stops cleanly releases the lock so the standby leads at its next poll."""
    client = redis.Redis.from_url(redis_url)
    a = LeaderLock(client, key="t:leader", instance_id="a", ttl=60)
    b = LeaderLock(client, key="t:leader", instance_id="b", ttl=60)
    assert a.acquire_or_renew()
    b.release()  # not the holder: nothing happens
    assert a.holder() == "a"
    a.release()
    assert b.acquire_or_renew()


def test_policy_watcher_applies_good_edit_and_keeps_last_good(tmp_path: Path) -> None:
    """A good edit is applied at the next poll; a bad one is reported and the last good policy stays."""
    path = tmp_path / "p.yaml"
    original = (ROOT / "policies" / "default.yaml").read_text()
    path.write_text(original)
    watcher = PolicyWatcher(path)
    assert watcher.poll() == (watcher.policy, None)

    path.write_text(original.replace("replicas: 10}", "replicas: 9}"))
    policy, event = watcher.poll()
    assert event == "reloaded"
    assert policy.pools[0].tiers is not None and policy.pools[0].tiers[0].replicas == 9

    path.write_text(original.replace("min: 2", "min: 20"))
    kept, event = watcher.poll()
    assert event == "invalid"
    assert kept is policy
    assert any("min (20) is greater than max (10)" in e for e in watcher.last_errors)

    path.unlink()
    kept, event = watcher.poll()
    assert (event, kept is policy) == ("invalid", True)


def test_policy_watcher_force_reload_rereads_unchanged_file(tmp_path: Path) -> None:
    """SIGHUP's forced reload re-reads the file even when its content did not change."""
    path = tmp_path / "p.yaml"
    path.write_text((ROOT / "policies" / "default.yaml").read_text())
    watcher = PolicyWatcher(path)
    assert watcher.poll(force=True)[1] == "reloaded"


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_endpoints() -> None:
    """/healthz answers alive, /readyz follows readiness, /metrics serves the Prometheus text format."""
    metrics = Metrics()
    metrics.leader.set(1)
    ready = {"value": False}
    server = HealthServer(
        host="127.0.0.1",
        port=0,
        metrics=metrics,
        readiness=lambda: (ready["value"], {"role": "standby", "last_good_tick_age_s": None}),
    )
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert _get(base + "/healthz")[0] == 200
        assert _get(base + "/readyz")[0] == 503
        ready["value"] = True
        code, body = _get(base + "/readyz")
        assert (code, json.loads(body)["role"]) == (200, "standby")
        code, body = _get(base + "/metrics")
        assert code == 200 and "autoscaler_leader 1.0" in body
        assert _get(base + "/nope")[0] == 404
    finally:
        server.stop()


@pytest.mark.redis
def test_a_lock_written_without_expiry_expires_instead_of_stopping_scaling_forever(redis_url: str) -> None:
    """A broker client (or a hand) SETs the leader key with no expiry: no controller could ever lead again.
    Seeing it, a controller caps its life at two of its own leases, then takes it (Trust boundaries I, 10)."""
    client = redis.Redis.from_url(redis_url)
    client.set("autoscaler:leader", "intruder")
    lock = LeaderLock(client, key="autoscaler:leader", instance_id="a", ttl=0.3)
    assert lock.acquire_or_renew() is Lease.HELD_BY_OTHER
    assert 0 < client.pttl("autoscaler:leader") <= 600
    time.sleep(0.7)
    assert lock.acquire_or_renew() is Lease.ACQUIRED
    assert lock.holder() == "a"


@pytest.mark.redis
def test_old_templates_are_deleted_from_the_broker_when_the_state_has_its_own_redis(
    redis_url: str, tmp_path: Path
) -> None:
    """Earlier versions kept container templates (worker secrets included) beside their state, i.e. in the
    broker; a controller whose state now lives elsewhere still deletes them from the broker at start."""
    broker = redis.Redis.from_url(redis_url)
    broker.set("autoscaler:template:stack:worker-fast", b'{"container": {"Config": {"Env": ["DB_PASSWORD=x"]}}}')
    state_url = redis_url.rsplit("/", 1)[0] + "/1"
    settings = Settings(redis_url=redis_url, state_redis_url=state_url,
                        policy=str(ROOT / "policies" / "default.yaml"), metrics_port=0)
    app = build_controller(settings)
    app.controller.backend.close()
    assert broker.keys("autoscaler:template:*") == []
