"""The containers the doctor looks at, read from the Engine API with read-only calls only.

Per Compose project of the policy's pools: one container listing filtered on the project label (the call
the socket proxy allows), then an inspect of each container, and for the pools' running containers a few
one-shot stats samples (memory). Nothing here creates, starts, stops, removes or changes anything.

`container_facts` turns an inspect answer into `ContainerFacts` and accepts anything: wrong types,
missing fields, thousands of environment entries, non-UTF-8 text.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors
import docker.utils
import requests

from autoscaler.backends.compose_model import PROJECT_LABEL, SERVICE_LABEL
from autoscaler.doctor.findings import CannotCheckError
from autoscaler.doctor.redact import printable, safe_error

__all__ = [
    "MAX_CONTAINERS",
    "MAX_ENV_ENTRIES",
    "ContainerFacts",
    "EngineReader",
    "container_facts",
    "memory_in_use",
]

MAX_CONTAINERS = 300  # per project: the doctor reports on what it read and says when it stopped
MAX_ENV_ENTRIES = 2000  # a container's environment beyond this is not read (and the finding says so)
MAX_ENV_VALUE = 4096  # longer values are cut: no address or module name is that long


@dataclass(frozen=True)
class ContainerFacts:
    id: str
    name: str
    project: str
    service: str
    running: bool
    image: str  # as configured (the tag)
    image_id: str  # what it actually runs
    hostname: str
    env: Mapping[str, str]
    env_truncated: bool
    command: tuple[str, ...]
    memory_limit: int  # bytes, 0 = none
    network_mode: str
    networks: Mapping[str, frozenset[str]]  # network name -> names it answers to there
    extra_hosts: frozenset[str] = frozenset()
    labels: Mapping[str, str] = field(default_factory=dict)

    def answers_to(self) -> frozenset[str]:
        """Names Docker's DNS resolves to this container on its networks."""
        names = {self.name, self.id[:12]}
        for aliases in self.networks.values():
            names |= aliases
        return frozenset(n for n in names if n)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any, limit: int = 512) -> str:
    return printable(value, limit) if isinstance(value, str | bytes) else ""


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _env(raw: Any) -> tuple[dict[str, str], bool]:
    env: dict[str, str] = {}
    entries = raw if isinstance(raw, list) else []
    for raw_entry in entries[:MAX_ENV_ENTRIES]:
        entry = raw_entry.decode("utf-8", "backslashreplace") if isinstance(raw_entry, bytes) else raw_entry
        if not isinstance(entry, str) or "=" not in entry:
            continue
        name, _, value = entry.partition("=")
        env[name[:256]] = value[:MAX_ENV_VALUE]
    return env, len(entries) > MAX_ENV_ENTRIES


def _names(value: Any) -> frozenset[str]:
    return frozenset(_str(v, 256) for v in value if isinstance(v, str)) if isinstance(value, list) else frozenset()


def container_facts(inspect: Any) -> ContainerFacts:
    """The parts of an inspect answer the checks use; whatever it holds, never raises."""
    data = _dict(inspect)
    config, host, state = _dict(data.get("Config")), _dict(data.get("HostConfig")), _dict(data.get("State"))
    labels = {str(k)[:256]: _str(v) for k, v in list(_dict(config.get("Labels")).items())[:500]}
    env, truncated = _env(config.get("Env"))
    networks: dict[str, frozenset[str]] = {}
    for net_name, net in list(_dict(_dict(data.get("NetworkSettings")).get("Networks")).items())[:50]:
        settings = _dict(net)
        networks[_str(net_name, 256)] = _names(settings.get("Aliases")) | _names(settings.get("DNSNames"))
    path = _str(data.get("Path"))
    raw_args = data.get("Args")
    args: list[Any] = raw_args if isinstance(raw_args, list) else []
    command = tuple(_str(a) for a in [path, *args[:200]] if isinstance(a, str) and a)
    return ContainerFacts(
        id=_str(data.get("Id"), 128),
        name=_str(data.get("Name"), 256).lstrip("/"),
        project=labels.get(PROJECT_LABEL, ""),
        service=labels.get(SERVICE_LABEL, ""),
        running=state.get("Running") is True,
        image=_str(config.get("Image")),
        image_id=_str(data.get("Image")),
        hostname=_str(config.get("Hostname"), 256),
        env=env,
        env_truncated=truncated,
        command=command,
        memory_limit=_int(host.get("Memory")),
        network_mode=_str(host.get("NetworkMode"), 256),
        networks=networks,
        extra_hosts=frozenset(h.partition(":")[0] for h in _names(host.get("ExtraHosts"))),
        labels=labels,
    )


def memory_in_use(stats: Any) -> int | None:
    """Bytes in use as `docker stats` shows it (usage minus inactive file cache), or None if not in `stats`."""
    memory = _dict(_dict(stats).get("memory_stats"))
    usage = memory.get("usage")
    if not isinstance(usage, int) or isinstance(usage, bool) or usage < 0:
        return None
    detail = _dict(memory.get("stats"))
    cache = detail.get("inactive_file", detail.get("total_inactive_file", 0))  # cgroup v2, then v1
    cache = cache if isinstance(cache, int) and not isinstance(cache, bool) and 0 <= cache <= usage else 0
    return usage - cache


_ENGINE_ERRORS = (docker.errors.DockerException, requests.RequestException, OSError, ValueError)


class EngineReader:
    """Read-only Engine API access for the doctor: list, inspect, one-shot stats. Nothing else."""

    def __init__(self, base_url: str | None, *, timeout: float = 10.0) -> None:
        try:
            kwargs: dict[str, Any] = dict(docker.utils.kwargs_from_env())
            if base_url:
                kwargs["base_url"] = base_url
            self._api = docker.APIClient(timeout=int(max(1, timeout)), **kwargs)
            self._api.ping()
        except _ENGINE_ERRORS as exc:
            raise CannotCheckError(f"cannot reach the Docker engine: {safe_error(exc, 300)}") from None
        self._lock = threading.Lock()

    def project_containers(self, project: str) -> tuple[list[ContainerFacts], bool]:
        """Every container of a Compose project, inspected; and whether the listing was cut at MAX_CONTAINERS."""
        try:
            listed = self._api.containers(all=True, filters={"label": [f"{PROJECT_LABEL}={project}"]})
        except _ENGINE_ERRORS as exc:
            raise CannotCheckError(f"cannot list the containers of project {project}: {safe_error(exc, 300)}") from None
        found: list[ContainerFacts] = []
        entries = listed if isinstance(listed, list) else []
        for entry in entries[:MAX_CONTAINERS]:
            container_id = _str(_dict(entry).get("Id"), 128)
            try:
                found.append(container_facts(self._api.inspect_container(container_id)))
            except _ENGINE_ERRORS:
                continue  # removed between the listing and the inspect
        return found, len(entries) > MAX_CONTAINERS

    def own_project(self) -> str | None:
        """The Compose project of the container the doctor runs in (`compose run autoscaler doctor`), if any."""
        try:
            own = container_facts(self._api.inspect_container(socket.gethostname()))
        except _ENGINE_ERRORS:
            return None  # not in a container, or not one the engine (or its proxy) shows
        return own.project or None

    def memory_samples(self, containers: Sequence[ContainerFacts], *, samples: int, interval: float,
                       stop: Callable[[], bool] | None = None) -> dict[str, list[int]]:
        """Container id -> bytes in use per sample (`samples` one-shot stats, `interval` s apart)."""
        series: dict[str, list[int]] = {c.id: [] for c in containers}
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="doctor-stats") as executor:
            for index in range(samples):
                if index:
                    time.sleep(interval)
                if stop is not None and stop():
                    break
                for container, used in zip(containers, executor.map(self._memory, containers), strict=True):
                    if used is not None:
                        series[container.id].append(used)
        return series

    def _memory(self, container: ContainerFacts) -> int | None:
        try:
            return memory_in_use(self._api.stats(container.id, stream=False, one_shot=True))
        except _ENGINE_ERRORS:
            return None

    def close(self) -> None:
        self._api.close()
