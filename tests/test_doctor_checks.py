"""The doctor's judging (autoscaler.doctor): pure checks over what was read, total over hostile input.

Every reader answer here could come from something the doctor does not control (a Redis INFO, a container's
environment, a worker's inspect reply): whatever it holds, a check gives findings (FAIL/WARN/PASS with what it
saw), never a traceback, and nothing it prints carries a secret.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.doctor.broker import BrokerFacts, broker_findings
from autoscaler.doctor.containers import ContainerFacts, container_facts, memory_in_use
from autoscaler.doctor.drift import drift_findings, eager_env_findings
from autoscaler.doctor.findings import Finding, Status, exit_code
from autoscaler.doctor.memory import is_growing, memory_findings
from autoscaler.doctor.networking import address_findings, host_of
from autoscaler.doctor.output import render_json, render_text
from autoscaler.doctor.postgres import PostgresFacts, postgres_findings
from autoscaler.doctor.redact import REDACTED, redact_url, shown_value
from autoscaler.doctor.routing import pool_worker_map, prefetch_findings, routing_findings
from autoscaler.doctor.workers import worker_facts
from autoscaler.policy.model import PoolPolicy
from autoscaler.types import QueueStats

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)


def container(name: str = "p-worker-1", *, service: str = "worker", env: dict[str, str] | None = None,
              networks: dict[str, frozenset[str]] | None = None, image_id: str = "sha256:aaa",
              memory_limit: int = 1 << 30, command: tuple[str, ...] = ("celery", "worker"),
              network_mode: str = "p_default", hostname: str = "") -> ContainerFacts:
    return ContainerFacts(
        id=name.ljust(64, "0"), name=name, project="p", service=service, running=True, image="img:1",
        image_id=image_id, hostname=hostname or name, env=env or {}, env_truncated=False, command=command,
        memory_limit=memory_limit, network_mode=network_mode,
        networks=networks if networks is not None else {"p_default": frozenset({service})})


def pool(name: str = "fast", queues: tuple[str, ...] = ("fast",), maximum: int = 10) -> PoolPolicy:
    return PoolPolicy.model_validate({"name": name, "target": {"compose": {"service": f"worker-{name}"}},
                                      "queues": list(queues), "min": 0, "max": maximum,
                                      "tiers": [{"above": 1, "replicas": maximum}]})


def by_check(findings: list[Finding], check: str) -> list[Finding]:
    return [f for f in findings if f.check == check]


def all_text(findings: list[Finding]) -> str:
    return render_text(findings) + render_json(findings)


# -- broker ---------------------------------------------------------------------------------------------------

def test_the_seeds_redis_fails_on_eviction_and_persistence() -> None:
    info = {"maxmemory_policy": "allkeys-lru", "aof_enabled": 0, "maxmemory": 512 << 20, "used_memory": 10 << 20}
    found = broker_findings(BrokerFacts("redis://r:6379/0", info, {"save": ""}, ("on", "nopass"), False))
    assert [f.status for f in by_check(found, "eviction policy")] == [Status.FAIL]
    assert [f.status for f in by_check(found, "persistence")] == [Status.FAIL]
    assert [f.status for f in by_check(found, "password")] == [Status.WARN]
    assert exit_code(found) == 1


def test_a_broker_configured_as_the_stack_passes() -> None:
    info = {"maxmemory_policy": "noeviction", "aof_enabled": 1, "maxmemory": 512 << 20, "used_memory": 10 << 20}
    found = broker_findings(BrokerFacts("redis://r:6379/0", info, {}, ("on", "#abc"), True))
    assert {f.status for f in found} == {Status.PASS}


@pytest.mark.parametrize(("used", "status"), [(400, Status.PASS), (420, Status.WARN), (490, Status.FAIL)])
def test_memory_used_against_maxmemory(used: int, status: Status) -> None:
    info = {"maxmemory_policy": "noeviction", "aof_enabled": 1, "maxmemory": 500, "used_memory": used}
    assert by_check(broker_findings(BrokerFacts("r", info)), "memory used")[0].status is status


def test_no_maxmemory_and_an_unreadable_config_warn() -> None:
    found = broker_findings(BrokerFacts("r", {"maxmemory": "0", "aof_enabled": "0"}))
    assert by_check(found, "maxmemory")[0].status is Status.WARN
    assert "CONFIG GET save refused" in by_check(found, "persistence")[0].saw
    assert by_check(found, "eviction policy")[0].status is Status.WARN


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["maxmemory_policy", "aof_enabled", "maxmemory", "used_memory", "x"]), JSON),
       st.dictionaries(st.sampled_from(["save", "maxmemory-policy", "maxmemory"]), JSON),
       st.none() | st.lists(st.text(max_size=10)).map(tuple), st.booleans())
def test_any_info_answer_gives_findings_never_a_traceback(info: dict[str, Any], config: dict[str, Any],
                                                           flags: tuple[str, ...] | None, password: bool) -> None:
    found = broker_findings(BrokerFacts("redis://r", info, config, flags, password))
    assert {"eviction policy", "persistence", "maxmemory", "password"} <= {f.check for f in found}
    assert all(f.saw for f in found)
    json.loads(render_json(found))


# -- containers, networking, redaction ---------------------------------------------------------------------------

def test_localhost_in_a_workers_broker_url_fails_and_names_the_variable() -> None:
    worker = container(env={"CELERY_BROKER_URL": "redis://:hunter22@localhost:6379/0"})
    found = address_findings([worker], [worker])
    failed = [f for f in found if f.status is Status.FAIL]
    assert len(failed) == 1 and "CELERY_BROKER_URL" in failed[0].saw and "localhost" in failed[0].saw
    assert "hunter22" not in all_text(found)
    assert "found CELERY_BROKER_URL" in by_check(found, "variables read")[0].saw


def test_a_name_nobody_answers_to_fails_on_project_networks_and_warns_on_external_ones() -> None:
    redis_container = container("p-redis-1", service="redis")
    worker = container(env={"BROKER_URL": "redis://redis:6379/0", "DATABASE_URL": "postgres://u@db/x",
                            "DB_HOST": "db.example.com"})
    found = {f.saw.split("=")[0]: f.status for f in address_findings([worker], [worker, redis_container])
             if f.check == "address"}
    assert found == {"BROKER_URL": Status.PASS, "DATABASE_URL": Status.FAIL, "DB_HOST": Status.PASS}
    outside = container(env={"DATABASE_URL": "postgres://u@db/x"}, networks={"shared": frozenset()})
    assert by_check(address_findings([outside], [outside]), "address")[0].status is Status.WARN


def test_loopback_on_the_hosts_network_is_the_host() -> None:
    worker = container(env={"REDIS_URL": "redis://127.0.0.1:6379"}, network_mode="host")
    assert by_check(address_findings([worker], [worker]), "address")[0].status is Status.PASS


@pytest.mark.parametrize(("value", "host"), [
    ("redis://localhost:6379/0", "localhost"), ("redis://[::1]:6379", "::1"), ("db", "db"), ("redis:6379", "redis"),
    ("postgres://u:p@db1,db2/x", "db1"), ("unix:///run/redis.sock", None), ("/var/run/postgresql", None),
    ("redis://[::1", None), ("", None),
])
def test_hosts_are_read_from_urls_and_bare_names(value: str, host: str | None) -> None:
    assert host_of(value)[0] == host


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["CELERY_BROKER_URL", "DB_HOST", "X_REDIS_URL", "PYTHONPATH", "OTHER"]),
                       st.text(max_size=60) | st.from_regex(r"[a-z]{2,6}://[^ ]{0,30}", fullmatch=True)),
       st.sampled_from(["p_default", "host", ""]))
def test_any_environment_gives_findings_never_a_traceback(env: dict[str, str], mode: str) -> None:
    worker = container(env=env, network_mode=mode)
    found = address_findings([worker], [worker]) + drift_findings({"x": [worker]}, [worker])
    found += eager_env_findings([worker])
    assert all(f.status in Status for f in found)
    json.loads(render_json(found))


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"[A-Za-z0-9!$%&'()*+,;=._~-]{8,24}", fullmatch=True), st.sampled_from(["redis", "postgres"]))
def test_a_password_in_an_address_is_never_printed(password: str, scheme: str) -> None:
    secret = f"Zq{password}"
    worker = container(env={"DATABASE_URL": f"{scheme}://user:{secret}@localhost:5432/db", "API_TOKEN": secret,
                            "DB_PASSWORD": secret, "DJANGO_SECRET_KEY": secret})
    found = address_findings([worker], [worker]) + drift_findings({"x": [worker]}, [])
    assert secret not in all_text(found)


def test_secrets_are_redacted_by_name_and_in_urls() -> None:
    assert shown_value("DJANGO_SECRET_KEY", "abc") == REDACTED
    assert shown_value("AWS_ACCESS_KEY", "abc") == REDACTED
    assert shown_value("GITHUB_TOKEN", "abc") == REDACTED
    assert redact_url("redis://:pw@redis:6379/0") == f"redis://:{REDACTED}@redis:6379/0"
    assert redact_url("postgres://db/x?password=pw&sslmode=require") == f"postgres://db/x?password={REDACTED}&sslmode=require"
    assert "pw" not in redact_url("redis://u:pw@[::1")  # does not parse: redacted as text


def test_an_inspect_answer_of_any_shape_is_read() -> None:
    env = [f"V{i}=x" for i in range(5000)] + [b"B=\xff\xfe".decode("latin-1")]
    facts = container_facts({"Id": "c" * 64, "Name": "/w", "Config": {"Env": env, "Image": 3}, "State": "up"})
    assert facts.env_truncated and facts.name == "w" and facts.image == "" and not facts.running


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["Id", "Name", "Config", "HostConfig", "State", "NetworkSettings", "Image",
                                        "Args", "Path"]), JSON) | JSON)
def test_any_inspect_answer_gives_facts_never_a_traceback(answer: Any) -> None:
    facts = container_facts(answer)
    address_findings([facts], [facts])
    memory_in_use(answer)


def test_memory_in_use_is_usage_minus_inactive_file() -> None:
    assert memory_in_use({"memory_stats": {"usage": 100, "stats": {"inactive_file": 30}}}) == 70
    assert memory_in_use({"memory_stats": {"usage": 100, "stats": {"total_inactive_file": 500}}}) == 100
    assert memory_in_use({"memory_stats": {}}) is None


# -- drift and eager --------------------------------------------------------------------------------------------

def test_two_workers_of_a_pool_with_different_settings_modules_fail() -> None:
    a = container("a", env={"DJANGO_SETTINGS_MODULE": "core.settings"})
    b = container("b", env={"DJANGO_SETTINGS_MODULE": "core.settings_old"})
    found = drift_findings({"fast": [a, b]}, [])
    assert by_check(found, "DJANGO_SETTINGS_MODULE within the pool")[0].status is Status.FAIL
    assert by_check(found, "image within the pool")[0].status is Status.PASS


def test_web_against_workers_fails_on_pythonpath_and_warns_on_the_image() -> None:
    worker = container("w", env={"PYTHONPATH": "/app"})
    web = container("web", service="web", env={"PYTHONPATH": "/srv"}, image_id="sha256:bbb")
    found = drift_findings({"fast": [worker]}, [web])
    assert by_check(found, "PYTHONPATH web vs workers")[0].status is Status.FAIL
    assert by_check(found, "image web vs workers")[0].status is Status.WARN


def test_an_eager_variable_in_a_containers_environment_fails() -> None:
    found = eager_env_findings([container(env={"CELERY_TASK_ALWAYS_EAGER": "True"}), container("b")])
    assert [f.status for f in found] == [Status.FAIL, Status.PASS]


# -- workers, routing, prefetch, memory --------------------------------------------------------------------------

def replies(node: str, queues: list[str], *, pool: str = "celery.concurrency.prefork:TaskPool", concurrency: int = 8,
            max_tasks: Any = "N/A", conf: dict[str, Any] | None = None) -> tuple[dict[str, Any], ...]:
    return ({node: [{"name": q} for q in queues]},
            {node: {"pool": {"implementation": pool, "max-concurrency": concurrency,
                             "max-tasks-per-child": max_tasks}}},
            {node: conf or {}})


def test_worker_replies_are_read() -> None:
    workers = worker_facts(*replies("celery@abc", ["fast"], max_tasks=500,
                                    conf={"task_always_eager": True, "worker_prefetch_multiplier": 1}))
    w = workers["celery@abc"]
    assert (w.host, w.queues, w.pool, w.concurrency, w.max_tasks_per_child, w.prefetch_multiplier, w.always_eager) == (
        "abc", frozenset({"fast"}), "prefork", 8, 500, 1, True)
    assert worker_facts(*replies("celery@x", []))["celery@x"].prefetch_multiplier == 4  # Celery's default
    # Django's namespace (config_from_object(..., namespace="CELERY")) keeps the settings' own names.
    django = worker_facts(*replies("celery@d", [], conf={"CELERY_WORKER_PREFETCH_MULTIPLIER": 1,
                                                         "CELERY_TASK_ALWAYS_EAGER": True}))["celery@d"]
    assert (django.prefetch_multiplier, django.always_eager) == (1, True)


@settings(max_examples=300, deadline=None)
@given(JSON, JSON, JSON)
def test_any_inspect_reply_gives_workers_never_a_traceback(queues: Any, stats: Any, conf: Any) -> None:
    workers = worker_facts(queues, stats, conf)
    routing_findings([pool()], {"fast": [container()]}, workers, {"fast": QueueStats("fast", 3)})
    prefetch_findings([pool()], pool_worker_map({"fast": [container()]}, workers), {"fast": QueueStats("fast", 3, 9)})


def test_a_queue_with_waiting_work_and_no_consumer_fails() -> None:
    workers = worker_facts(*replies("celery@p-worker-1", ["fast"]))
    queues = {"fast": QueueStats("fast", 0), "orphan": QueueStats("orphan", 5), "empty": QueueStats("empty", 0)}
    found = routing_findings([pool()], {"fast": [container()]}, workers, queues)
    status = {f.subject: f.status for f in by_check(found, "queue consumed")}
    assert status == {"queue fast": Status.PASS, "queue orphan": Status.FAIL, "queue empty": Status.PASS}


def test_a_pool_whose_workers_consume_other_queues_fails() -> None:
    workers = worker_facts(*replies("celery@p-worker-1", ["celery"]))
    found = routing_findings([pool()], {"fast": [container()]}, workers, {"fast": QueueStats("fast", 4)})
    assert [f.status for f in by_check(found, "pool consumes its queues")] == [Status.FAIL]
    assert "not fast" in by_check(found, "pool consumes its queues")[0].saw


def test_unacked_far_above_what_the_workers_may_prefetch_warns() -> None:
    workers = worker_facts(*replies("celery@p-worker-1", ["fast"], concurrency=2,
                                    conf={"worker_prefetch_multiplier": 1}))
    mapping = pool_worker_map({"fast": [container()]}, workers)
    calm = prefetch_findings([pool()], mapping, {"fast": QueueStats("fast", 0, unacked=2)})
    hoard = prefetch_findings([pool()], mapping, {"fast": QueueStats("fast", 0, unacked=40)})
    assert (calm[0].status, hoard[0].status) == (Status.PASS, Status.WARN)


def test_growth_needs_three_rising_samples_and_ten_percent() -> None:
    assert is_growing([100, 105, 111])
    assert not is_growing([100, 111])
    assert not is_growing([100, 120, 119])
    assert not is_growing([100, 101, 102])


def test_memory_limits_usage_and_recycling() -> None:
    bare = container("bare", memory_limit=0, hostname="bare")
    threads = container("threads", hostname="threads")
    workers = {**worker_facts(*replies("celery@bare", ["fast"])),
               **worker_facts(*replies("celery@threads", ["fast"], pool="celery.concurrency.thread:TaskPool"))}
    found = memory_findings({"fast": [bare, threads]}, {bare.id: [1 << 29] * 3, threads.id: [2 << 30] * 3}, workers,
                            window=4)
    status = {(f.check, f.subject): f.status for f in found}
    assert status[("memory limit", "bare")] is Status.WARN
    assert status[("child recycling", "bare")] is Status.WARN
    assert status[("child recycling", "threads")] is Status.PASS
    assert status[("memory in use", "threads")] is Status.WARN  # above 1 GiB


# -- postgres, exit codes ------------------------------------------------------------------------------------------

def test_a_low_max_connections_fails_against_the_policys_worst_case() -> None:
    workers = worker_facts(*replies("celery@p-worker-1", ["fast"], concurrency=8))
    mapping = pool_worker_map({"fast": [container()]}, workers)
    found = postgres_findings(PostgresFacts("postgres://db", 20, 3, 4), [pool()], {"fast": [container()]}, mapping,
                              web_connections=16, per_process=1)
    worst = by_check(found, "worst case vs max_connections")[0]
    assert worst.status is Status.FAIL and "fast 10x8x1=80 + web 16 = 96 vs 17 usable of 20" in worst.saw
    assert by_check(found, "connections in use")[0].status is Status.PASS


@pytest.mark.parametrize(("statuses", "strict", "code"), [
    ([Status.PASS], False, 0), ([Status.PASS, Status.WARN], False, 0), ([Status.WARN], True, 1),
    ([Status.FAIL, Status.UNKNOWN], False, 1), ([Status.UNKNOWN, Status.WARN], False, 2), ([], False, 0),
])
def test_exit_codes(statuses: list[Status], strict: bool, code: int) -> None:
    findings = [Finding("broker", "x", s, "saw") for s in statuses]
    assert exit_code(findings, strict=strict) == code
    assert json.loads(render_json(findings, strict=strict))["exit_code"] == code
    assert render_text(findings, strict=strict).endswith(f"exit {code}")


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80) | st.from_regex(r"[a-z+]{1,10}://[^/]{0,40}(/[^ ]{0,20})?", fullmatch=True))
def test_any_url_is_read_or_refused_never_a_traceback(url: str) -> None:
    host_of(url)
    shown = redact_url(url)
    assert isinstance(shown, str)


def test_broken_urls_and_unreachable_sources_are_unknown_never_a_traceback(tmp_path: Any) -> None:
    from autoscaler.doctor.runner import DoctorOptions, run_doctor  # noqa: PLC0415
    from autoscaler.policy.model import Policy  # noqa: PLC0415

    policy = Policy.model_validate({"pools": [pool().model_dump()]})
    findings = run_doctor(DoctorOptions(policy=policy, redis_url="redis://:sEcr3t@[::1", docker_host="tcp://127.0.0.1:1",
                                        database_url="postgresql://u:sEcr3t@[bad/db"))
    assert {f.area: f.status for f in findings} == {"broker": Status.UNKNOWN, "environment": Status.UNKNOWN,
                                                    "postgres": Status.UNKNOWN}
    assert exit_code(findings) == 2
    assert "sEcr3t" not in all_text(findings)


@pytest.mark.redis
def test_declared_queues_are_read_from_kombus_bindings(redis_url: str) -> None:
    import redis  # noqa: PLC0415

    from autoscaler.doctor.runner import declared_queues  # noqa: PLC0415

    client = redis.Redis.from_url(redis_url)
    sep = "\x06\x16"
    client.sadd("_kombu.binding.orphan", f"orphan{sep}{sep}orphan")
    client.sadd("_kombu.binding.celery.pidbox", f"{sep}{sep}celery@x.celery.pidbox")
    client.sadd("_kombu.binding.odd", b"\xff\xfe" + sep.encode() * 2 + b"caf\xc3\xa9")
    client.set("_kombu.binding.string", "not a set")
    assert declared_queues(client) == {"orphan", "café"}
    client.close()
