"""The reaction benchmark's rig (bench/reaction.py): its Compose project, the controller as a subprocess, and
the instruments that time a burst (queue sampler, Docker `start` events, the workers' ledger, Celery's
`active_queues`). Everything here is started by the bench and removed by it, by project name.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import redis
from celery import Celery

__all__ = [
    "QUEUE",
    "REPO",
    "SERVICE",
    "ControllerProcess",
    "Project",
    "QueueSampler",
    "StartEvents",
    "consuming_workers",
    "process_cpu_seconds",
    "sigterm_as_interrupt",
]

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = Path(__file__).resolve().parent / "reaction_compose.yaml"
SERVICE = "worker-fast"
QUEUE = "fast"
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


def compose_command() -> list[str]:
    """`docker compose` (v2) when the plugin is there, else `docker-compose` (v1)."""
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if probe.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise RuntimeError("neither `docker compose` nor `docker-compose` is installed (scripts/docker-up.sh)")


@dataclass
class Project:
    """One Compose project under a unique name (bench/reaction_compose.yaml), driven by the real CLI."""

    name: str
    stack_image: str
    client: docker.DockerClient
    command: list[str] = field(default_factory=compose_command)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Django refuses a short or well-known key outside dev mode; nothing is signed with it here.
        self.env = {"BENCH_STACK_IMAGE": self.stack_image, "BENCH_SECRET": secrets.token_urlsafe(48)}

    def run(self, *args: str, check: bool = True, timeout: float = 240) -> str:
        cmd = [*self.command, "-p", self.name, "-f", str(COMPOSE_FILE), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **self.env}, check=False,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def up(self) -> None:
        self.run("up", "-d")

    def port(self, service: str) -> int:
        # "127.0.0.1:32779"
        return int(self.run("port", service, "6379").strip().rsplit(":", 1)[1])

    def containers(self, *, running_only: bool = False) -> list[Any]:
        labels = [f"{PROJECT_LABEL}={self.name}", f"{SERVICE_LABEL}={SERVICE}"]
        return list(self.client.containers.list(all=not running_only, filters={"label": labels},
                                                ignore_removed=True))

    def running_ids(self) -> set[str]:
        return {c.id for c in self.containers(running_only=True) if c.status == "running"}

    def down(self) -> None:
        """`down`, then whatever carries the project's label (the controller's clones among them)."""
        with contextlib.suppress(subprocess.SubprocessError, RuntimeError, OSError):
            self.run("down", "-v", "--remove-orphans", "-t", "2", check=False, timeout=120)
        label = f"{PROJECT_LABEL}={self.name}"
        for container in self.client.containers.list(all=True, filters={"label": label}, ignore_removed=True):
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True, v=True)
        for network in self.client.networks.list(filters={"label": label}):
            with contextlib.suppress(docker.errors.APIError):
                network.remove()
        for volume in self.client.volumes.list(filters={"label": label}):
            with contextlib.suppress(docker.errors.APIError):
                volume.remove(force=True)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (Linux /proc; the controller starts no children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of stat(5) (utime, stime), counted after the ")" that ends the command name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _log_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class ControllerProcess:
    """`autoscaler run` from this checkout, JSON logs parsed as they come and copied to `log_path`."""

    def __init__(self, policy: Path, *, broker_url: str, state_url: str, leader_ttl: float, log_path: Path) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "AUTOSCALER_REDIS_URL": broker_url,
            "AUTOSCALER_STATE_REDIS_URL": state_url,
            "AUTOSCALER_LOG_FORMAT": "json",
            "AUTOSCALER_LOG_LEVEL": "INFO",
            "AUTOSCALER_METRICS_PORT": "0",
            "AUTOSCALER_LEADER_TTL": f"{leader_ttl:g}",
        }
        self.lines: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "autoscaler.cli", "run", "--policy", str(policy)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self._reader = threading.Thread(target=self._read, name="controller-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._log.write(raw)
            self._log.flush()
            try:
                line = json.loads(raw)
                line["t"] = _log_time(line["time"])
            except (ValueError, KeyError, TypeError):
                continue
            with self._lock:
                self.lines.append(line)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.lines)

    def actions_up(self, pool: str, since: float) -> list[dict[str, Any]]:
        """Scale-up (or activation) actions of `pool` that began at or after `since`, each with its start.

        An action's log line is written when it ends and carries its duration (`seconds`,
        autoscaler/actions.py): the decision was taken at `time - seconds`.
        """
        found = []
        for line in self.snapshot():
            seconds = line.get("seconds")
            if line.get("pool") != pool or not isinstance(seconds, int | float):
                continue
            message = str(line.get("message", "")).lower()
            if line.get("direction") != "up" and "activat" not in message:
                continue
            start = line["t"] - float(seconds)
            if start >= since:
                found.append({**line, "start": start})
        return sorted(found, key=lambda item: item["start"])

    def tick_times(self, pool: str) -> list[float]:
        """When each tick logged its decision for `pool` (autoscaler/observability/logs.py, log_decision)."""
        return [line["t"] for line in self.snapshot() if line.get("pool") == pool and "desired" in line
                and "queues" in line]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(timeout=5)
        self._log.close()


class StartEvents:
    """Docker `start` events of the pool's containers (daemon time), collected by a thread."""

    def __init__(self, client: docker.DockerClient, project: str) -> None:
        self.starts: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        filters = {"type": "container", "event": "start",
                   "label": [f"{PROJECT_LABEL}={project}", f"{SERVICE_LABEL}={SERVICE}"]}
        self._stream = client.events(decode=True, filters=filters)
        self._thread = threading.Thread(target=self._read, name="docker-events", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):  # the stream ends with an error when closed: that is the stop
            for event in self._stream:
                with self._lock:
                    self.starts.append((int(event["timeNano"]) / 1e9, str(event["id"])))

    def new_since(self, since: float, known: set[str]) -> list[tuple[float, str]]:
        """(time, full id) of each start since `since` of a container not in `known`, in order."""
        with self._lock:
            return sorted((t, cid) for t, cid in self.starts if t >= since and cid not in known)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stream.close()


class QueueSampler:
    """LLEN of the queue every `period` seconds: when it first held more than each threshold."""

    def __init__(self, url: str, thresholds: tuple[int, ...], period: float = 0.02) -> None:
        self.client = redis.Redis.from_url(url)
        self.thresholds = thresholds
        self.period = period
        self.first_above: dict[int, float] = {}
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-sampler", daemon=True)

    def __enter__(self) -> QueueSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            length = int(self.client.llen(QUEUE))
            now = time.time()
            self.peak = max(self.peak, length)
            for threshold in self.thresholds:
                if length > threshold and threshold not in self.first_above:
                    self.first_above[threshold] = now
            self._stop.wait(self.period)


def consuming_workers(app: Celery, timeout: float = 1.0) -> tuple[set[str], set[str]]:
    """(hosts that answered, hosts consuming the pool's queue): Celery's `active_queues` broadcast.

    A host is the part after "@" of the worker's name: the container's short id (-n worker-fast@%h).
    """
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    answered, consuming = set(), set()
    for name, queues in replies.items():
        host = name.rsplit("@", 1)[-1]
        answered.add(host)
        if any(q.get("name") == QUEUE for q in queues or []):
            consuming.add(host)
    return answered, consuming


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM cleans up like Ctrl-C does (the `finally` blocks remove what the bench started)."""

    def raise_interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
