"""The metrics users' dashboards know, end to end: a real Celery worker (with autoscaler.celery's worker
helper) runs tasks on a real redis-server, a real controller tick reads the broker, and its real /metrics
endpoint serves celery-exporter's names. Every autoscaler_* and celery_* name that the alert rules and the
Grafana dashboard use must be one that endpoint declares; the dashboard must be well formed.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from prometheus_client.parser import text_string_to_metric_families

import autoscaler.celery
from autoscaler.backends.memory import MemoryBackend
from autoscaler.leader import LeaderLock
from autoscaler.loop import Controller
from autoscaler.observability.http import HealthServer
from autoscaler.observability.metrics import Metrics
from autoscaler.policy.watch import PolicyWatcher
from autoscaler.sources.broker_stats import RedisBrokerStats
from autoscaler.sources.celery_redis import CeleryRedisSource
from autoscaler.state_store import RedisStateStore
from tests.conftest import RedisServer
from tests.test_loop import POLICY, publish

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.redis
NAME = re.compile(r"\b(?:autoscaler|celery)_[a-z0-9_]+\b")


def _worker_app(url: str) -> Celery:
    app = Celery("t20metrics", broker=url, set_as_current=False)
    app.conf.task_default_queue = "io_intensive"

    @app.task(name="t20.ok")
    def ok() -> int:
        return 1

    @app.task(name="t20.boom")
    def boom() -> None:
        raise RuntimeError("boom")

    autoscaler.celery.install_worker_stats(app, interval=0.5)
    return app


@pytest.fixture(scope="module")
def scrape(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The /metrics text after a real worker ran 3 good and 1 failing task (queue io_intensive, pool io) and
    a controller ticked, with 150 tasks waiting on fast (nobody consumes them: the fast pool scales up)."""
    if redis_server.proc is None:  # a previous test stopped it
        redis_server.start()
    redis_url = redis_server.url
    redis_server.client().flushall()
    app = _worker_app(redis_url)
    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING",
                      shutdown_timeout=10.0, queues=["io_intensive"]):
        results = [app.send_task("t20.ok", queue="io_intensive") for _ in range(3)]
        results.append(app.send_task("t20.boom", queue="io_intensive"))
        client = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 30
        while sum(int(v) for v in client.hgetall("_autoscaler:tasks:io_intensive").values()) < 4:
            assert time.monotonic() < deadline, client.hgetall("_autoscaler:tasks:io_intensive")
            time.sleep(0.05)
        assert client.hlen("_autoscaler:workers:io_intensive") == 1  # the worker's heartbeat, while it runs
        publish(redis_url, "fast", 150)  # above the 100 tier: the tick scales fast up (an action)
        policy = tmp_path_factory.mktemp("t20") / "policy.yaml"
        policy.write_text(POLICY)
        metrics = Metrics()
        controller = Controller(
            policies=PolicyWatcher(policy),
            source=CeleryRedisSource(url=redis_url, broker=PolicyWatcher(policy).policy.broker),
            backend=MemoryBackend({"worker-fast": 2, "worker-io": 2}),
            store=RedisStateStore(client, prefix="t20:"),
            metrics=metrics,
            lock=LeaderLock(client, key="t20:leader", instance_id="a", ttl=30),
            stats=RedisBrokerStats(redis.Redis.from_url(redis_url), where="test"),
        )
        report = controller.tick()
        assert report.pools[0].action is not None and report.pools[0].action.ok
        server = HealthServer(host="127.0.0.1", port=0, metrics=metrics, readiness=lambda: (True, {}))
        server.start()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as answer:
                text: str = answer.read().decode()
        finally:
            server.stop()
    # A clean stop removes the worker's heartbeat: only a worker that died stays (and reads as down).
    assert client.hlen("_autoscaler:workers:io_intensive") == 0
    return text


def _declared(text: str) -> set[str]:
    """Every sample name the endpoint declares (a family with no sample yet still says its name and type)."""
    names: set[str] = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "info": ("_info",)}
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found.setdefault(s.name, []).append((s.labels, s.value))
    return found


def _dashboard() -> dict[str, Any]:
    return dict(json.loads((ROOT / "deploy" / "grafana" / "autoscaler.json").read_text()))


def _dashboard_exprs(board: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    return exprs + [a["expr"] for a in board["annotations"]["list"] if "expr" in a]


def test_celery_exporter_names_come_from_a_real_worker_and_tick(scrape: str) -> None:
    samples = _samples(scrape)
    assert ({"queue_name": "fast"}, 150.0) in samples["celery_queue_length"]
    assert ({"name": "t20.ok", "queue_name": "io_intensive"}, 3.0) in samples["celery_task_succeeded_total"]
    assert ({"name": "t20.boom", "queue_name": "io_intensive"}, 1.0) in samples["celery_task_failed_total"]
    assert [v for _, v in samples["celery_worker_up"]] == [1.0]
    (labels, memory), = samples["autoscaler_worker_memory_bytes"]  # the cgroup's, read by the worker
    assert labels["pool"] == "io" and memory > 0
    assert samples["autoscaler_broker_memory_used_bytes"][0][1] > 0
    assert ({"pool": "fast", "queue": "fast"}, 1.0) in samples["autoscaler_pool_queue_info"]
    assert ({"pool": "fast"}, 10.0) in samples["autoscaler_pool_max_replicas"]
    assert samples["autoscaler_policy_interval_seconds"] == [({}, 1.0)]
    (labels, _), = samples["autoscaler_pool_last_action_timestamp_seconds"]
    assert labels == {"pool": "fast", "direction": "up", "result": "ok", "kind": "tiers"}


def test_every_name_in_the_rules_and_the_dashboard_is_exported(scrape: str) -> None:
    declared = _declared(scrape)
    rules = (ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text()
    used = set(NAME.findall(rules)) | {n for e in _dashboard_exprs(_dashboard()) for n in NAME.findall(e)}
    assert used, "no autoscaler_* or celery_* name found"
    assert used <= declared, sorted(used - declared)


def test_the_dashboard_is_well_formed() -> None:
    board = _dashboard()
    assert board["title"] and board["uid"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)) and all(t["expr"].strip() for t in panel["targets"])
        assert panel["type"] in {"timeseries", "stat", "table"}
    actions = [a for a in board["annotations"]["list"] if a.get("expr")]
    assert actions and all(a["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for a in actions)
    assert all(a["useValueForTime"] for a in actions)  # the series' value is the action's time (ms)
