"""`autoscaler doctor` against real instances started with testcontainers on the local images.

One misconfigured project (module-scoped, shared by every test here): a Redis with the seed's
`allkeys-lru` and no persistence, two workers of one pool with different settings modules, a worker whose
broker URL says localhost, a worker with task_always_eager, a queue with work nobody consumes, and a
PostgreSQL with max_connections=20. One well-configured project beside it must pass. The doctor runs as the
real CLI, its Engine API calls through a recording relay and its Redis commands watched with MONITOR: it
makes no Docker write call and no Redis write beyond Celery's remote-control messages.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")  # Ryuk's image cannot be pulled here

import psycopg
import pytest
from celery import Celery
from dockertest import unique_name, wait_until
from recording_proxy import RecordingProxy
from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network

from tests.docker.conftest import DockerEnv

ROOT = Path(__file__).resolve().parents[2]
POSTGRES_IMAGE = os.environ.get("POSTGRES_IMAGE", "autoscaler-local/postgres:15")
pytestmark = [pytest.mark.docker]
PG_PASSWORD = "pg-Secret-4711"
REDIS_PASSWORD = "redis-Secret-0815"
EAGER_WORKER = ("python -c \"import tasks; tasks.app.conf.task_always_eager = True; "
                "tasks.app.worker_main(['worker', '-Q', 'qe', '-n', 'eager@%h', '-P', 'solo'])\"")
# What the doctor may send to Redis: reads, and Celery's remote control: the broadcast (PUBLISH on the
# pidbox channel), its reply queue (named by a uuid, with kombu's priority sub-keys), the reply queue's
# binding (SADD/SREM) and kombu's expiry bookkeeping of that binding (ZADD to _kombu.binding_deadlines).
READ_COMMANDS = {"INFO", "CONFIG", "ACL", "SCAN", "SSCAN", "SMEMBERS", "LLEN", "HLEN", "HSCAN", "HGET", "HMGET",
                 "HKEYS", "HVALS", "HGETALL", "LRANGE", "LINDEX", "TYPE", "EXISTS", "MEMORY", "PING", "HELLO",
                 "CLIENT", "SELECT", "EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO", "SCRIPT", "GET", "MGET", "TTL",
                 "PTTL", "ZRANGE", "ZRANGEBYSCORE", "ZCARD", "SCARD", "SISMEMBER", "AUTH", "TIME", "MULTI", "EXEC"}
REPLY_QUEUE = re.compile(r"^[0-9a-f-]{36}\.reply\.celery\.pidbox(\\x06\\x16\d)?$")
REPLY_BINDING = re.compile(r"^_kombu\.binding(_permanent)?\.reply\.celery\.pidbox$")


def remote_control(command: list[str]) -> bool:
    name, args = command[0].upper(), command[1:]
    if name == "PUBLISH":
        return bool(re.match(r"^/\d+\.celery\.pidbox$", args[0]))
    if name in ("SADD", "SREM"):
        return bool(REPLY_BINDING.match(args[0]))
    if name == "ZADD":
        return args[0] == "_kombu.binding_deadlines" and args[-1] == "reply.celery.pidbox"
    if name == "BRPOP":
        return all(REPLY_QUEUE.match(k) for k in args[:-1])
    if name in ("DEL", "UNLINK", "LPOP", "RPOP"):
        return all(REPLY_QUEUE.match(k) for k in args)
    return False


@dataclass
class Project:
    name: str
    network: Network
    containers: list[DockerContainer] = field(default_factory=list)

    def start(self, container: DockerContainer, service: str, *aliases: str, **kwargs: Any) -> DockerContainer:
        container.with_network(self.network).with_network_aliases(service, *aliases).with_name(
            f"{self.name}-{service}-{len(self.containers) + 1}").with_kwargs(
            labels={"com.docker.compose.project": self.name, "com.docker.compose.service": service}, **kwargs)
        self.containers.append(container)
        container.start()
        return container

    def ip(self, container: DockerContainer) -> str:
        wrapped = container.get_wrapped_container()
        wrapped.reload()
        return str(wrapped.attrs["NetworkSettings"]["Networks"][self.network.name]["IPAddress"])

    def stop(self) -> None:
        for container in reversed(self.containers):
            container.stop()
        self.network.remove()


def project(tag: str) -> Project:
    network = Network()
    network.name = unique_name(tag)  # Network() names itself with a uuid: ours carry the test prefix
    network.create()
    return Project(network.name, network)


def workers_answering(broker: str, count: int) -> None:
    app = Celery("astest-doctor", broker=broker, set_as_current=False)
    try:
        wait_until(lambda: len(app.control.ping(timeout=1.0) or []) >= count, timeout=90,
                   what=f"{count} Celery workers to answer a ping")
    finally:
        app.close()


class Monitor:
    """Redis MONITOR on a connection of its own: every command any client sends, with its client address."""

    def __init__(self, host: str, password: str | None = None) -> None:
        self.lines: list[str] = []
        self._sock = socket.create_connection((host, 6379), timeout=10)
        if password:
            self._sock.sendall(f"AUTH {password}\r\n".encode())
            assert self._sock.recv(64).startswith(b"+OK")
        self._sock.sendall(b"MONITOR\r\n")
        assert self._sock.recv(64).startswith(b"+OK")
        self._sock.settimeout(None)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buffer = b""
        try:
            while data := self._sock.recv(65536):
                buffer += data
                *complete, buffer = buffer.split(b"\r\n")
                self.lines.extend(line.decode("utf-8", "replace") for line in complete)
        except OSError:
            pass

    def stop(self) -> list[tuple[str, list[str]]]:
        """(client ip, [command, args...]) of every command seen."""
        time.sleep(0.5)
        self._sock.close()
        self._thread.join(5)
        seen: list[tuple[str, list[str]]] = []
        script_client = "?"  # a script's commands follow its EVAL line (atomic): they are that client's
        for line in self.lines:
            match = re.match(r'^\+\S+ \[\d+ (?:lua|([0-9.]+):\d+)\] (.*)$', line)
            if not match:
                continue
            command = re.findall(r'"((?:[^"\\]|\\.)*)"', match.group(2))
            if match.group(1) is not None:
                script_client = match.group(1)
            seen.append((script_client, command))
        return seen


@dataclass
class Run:
    code: int
    report: dict[str, Any]
    stdout: str
    engine_calls: list[tuple[str, str]]
    redis_commands: list[list[str]]

    def findings(self, check: str, status: str | None = None) -> list[dict[str, Any]]:
        return [f for f in self.report["findings"] if f["check"] == check and (status is None or f["status"] == status)]


def run_doctor(tmp_path: Path, policy: str, *, redis_url: str, project_name: str, monitor: Monitor,
               client_ips: set[str], args: list[str]) -> Run:
    policy_file = tmp_path / f"{project_name}.yaml"
    policy_file.write_text(policy)
    proxy = RecordingProxy()
    env = {**os.environ, "AUTOSCALER_REDIS_URL": redis_url, "AUTOSCALER_COMPOSE_PROJECT": project_name,
           "DOCKER_HOST": proxy.url, "AUTOSCALER_POLICY": str(policy_file)}
    try:
        proc = subprocess.run([sys.executable, "-m", "autoscaler.cli", "doctor", "--json", *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120, check=False)
    finally:
        proxy.close()
    assert proc.stdout.strip(), proc.stderr
    commands = [cmd for ip, cmd in monitor.stop() if ip not in client_ips and cmd]
    return Run(proc.returncode, json.loads(proc.stdout), proc.stdout,
               [(r.method, r.path) for r in proxy.requests], commands)


MISCONFIGURED_POLICY = """
pools:
  a: {target: {compose: {service: worker-a}}, queues: [qa], min: 1, max: 10, tiers: [{above: 1, replicas: 2}]}
  eager: {target: {compose: {service: worker-eager}}, queues: [qe], min: 1, max: 2, tiers: [{above: 1, replicas: 2}]}
  local: {target: {compose: {service: worker-local}}, queues: [ql], min: 1, max: 2, tiers: [{above: 1, replicas: 2}]}
"""


@pytest.fixture(scope="module")
def misconfigured(docker_env: DockerEnv, worker_image: str, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Run]:
    p = project("doc")
    try:
        redis = p.start(DockerContainer(docker_env.redis_image).with_command(
            "redis-server --protected-mode no --maxmemory-policy allkeys-lru --appendonly no --save ''"), "redis")
        broker = "redis://redis:6379/0"
        for n, settings_module in enumerate(("shop.settings", "shop.settings_old")):
            p.start(DockerContainer(worker_image).with_command(f"celery -A tasks worker -Q qa -n a{n}@%h -P solo")
                    .with_env("BROKER_URL", broker).with_env("CELERY_BROKER_URL", broker)
                    .with_env("DJANGO_SETTINGS_MODULE", settings_module), "worker-a", mem_limit="256m")
        p.start(DockerContainer(worker_image).with_command(EAGER_WORKER).with_env("BROKER_URL", broker),
                "worker-eager", mem_limit="256m")
        p.start(DockerContainer(worker_image).with_env("CELERY_BROKER_URL", "redis://localhost:6379/0"),
                "worker-local")  # the sleeper: a worker that would crash on "Connection refused"
        postgres = p.start(DockerContainer(POSTGRES_IMAGE).with_command("postgres -c max_connections=20")
                           .with_env("POSTGRES_PASSWORD", PG_PASSWORD), "db")
        redis_url = f"redis://{p.ip(redis)}:6379/0"
        database_url = f"postgresql://postgres:{PG_PASSWORD}@{p.ip(postgres)}:5432/postgres"
        workers_answering(redis_url, 3)
        app = Celery("astest-doctor", broker=redis_url, set_as_current=False)
        for _ in range(3):
            app.send_task("astest.work", args=["k", 0], queue="orphan")  # a queue nobody consumes
        app.close()
        wait_until(lambda: _accepts(database_url), timeout=60, what="PostgreSQL to accept connections")
        client_ips = {p.ip(c) for c in p.containers}
        monitor = Monitor(p.ip(redis))
        yield run_doctor(tmp_path_factory.mktemp("doc"), MISCONFIGURED_POLICY, redis_url=redis_url,
                         project_name=p.name, monitor=monitor, client_ips=client_ips,
                         args=["--database-url", database_url, "--web-connections", "16"])
    finally:
        p.stop()


def _accepts(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def test_the_misconfigured_stack_fails_and_each_problem_is_named(misconfigured: Run) -> None:
    run = misconfigured
    assert run.code == 1, run.stdout
    assert run.findings("eviction policy", "FAIL") and run.findings("persistence", "FAIL")
    (local,) = run.findings("address", "FAIL")
    assert "CELERY_BROKER_URL=redis://localhost:6379/0" in local["saw"] and "worker-local" in local["subject"]
    (drift,) = run.findings("DJANGO_SETTINGS_MODULE within the pool", "FAIL")
    assert "shop.settings_old" in drift["saw"] and drift["subject"] == "pool a"
    (eager,) = run.findings("eager mode (worker conf)", "FAIL")
    assert eager["subject"].startswith("eager@")
    (orphan,) = run.findings("queue consumed", "FAIL")
    assert orphan["subject"] == "queue orphan" and "3 waiting" in orphan["saw"]
    (worst,) = run.findings("worst case vs max_connections", "FAIL")
    assert "of 20" in worst["saw"] and "web 16" in worst["saw"]
    assert run.findings("pool consumes its queues", "WARN")  # the localhost worker never answers
    assert PG_PASSWORD not in run.stdout


def test_the_doctor_makes_no_docker_write_call(misconfigured: Run) -> None:
    allowed = re.compile(r"^(/v1\.\d+)?(/_ping|/version|/containers/json|/containers/[0-9a-f]{64}/(json|stats))$")
    assert misconfigured.engine_calls, "the doctor made no Engine API call through the relay"
    for method, path in misconfigured.engine_calls:
        assert method == "GET" and allowed.match(path.partition("?")[0]), (method, path)


def test_the_doctor_writes_nothing_to_redis_but_remote_control(misconfigured: Run) -> None:
    assert misconfigured.redis_commands, "MONITOR saw nothing of the doctor"
    names = {c[0].upper() for c in misconfigured.redis_commands}
    assert {"INFO", "PUBLISH", "BRPOP"} <= names, names  # it did read, and asked the workers
    writes = [c for c in misconfigured.redis_commands if c[0].upper() not in READ_COMMANDS and not remote_control(c)]
    assert not writes, writes


GOOD_POLICY = """
pools:
  good: {target: {compose: {service: worker-good}}, queues: [qg], min: 1, max: 4, tiers: [{above: 1, replicas: 2}]}
"""


def test_a_well_configured_stack_passes(docker_env: DockerEnv, worker_image: str, tmp_path: Path) -> None:
    p = project("dok")
    try:
        redis = p.start(DockerContainer(docker_env.redis_image).with_command(
            f"redis-server --appendonly yes --maxmemory 64mb --maxmemory-policy noeviction "
            f"--requirepass {REDIS_PASSWORD}"), "redis")
        broker = f"redis://:{REDIS_PASSWORD}@redis:6379/0"
        for service in ("worker-good", "web"):
            p.start(DockerContainer(worker_image).with_command(
                "celery -A tasks worker -Q qg -n good@%h -c 1 --max-tasks-per-child=100" if service != "web" else "")
                .with_env("BROKER_URL", broker).with_env("DJANGO_SETTINGS_MODULE", "shop.settings"), service,
                mem_limit="256m")
        redis_url = f"redis://:{REDIS_PASSWORD}@{p.ip(redis)}:6379/0"
        workers_answering(redis_url, 1)
        monitor = Monitor(p.ip(redis), REDIS_PASSWORD)
        run = run_doctor(tmp_path, GOOD_POLICY, redis_url=redis_url, project_name=p.name, monitor=monitor,
                         client_ips={p.ip(c) for c in p.containers}, args=[])
    finally:
        p.stop()
    problems = [f for f in run.report["findings"] if f["status"] != "PASS"]
    assert run.code == 0, problems
    assert not [f for f in problems if f["check"] not in ("memory in use",)], problems  # a 4 s sample may rise
    assert REDIS_PASSWORD not in run.stdout
