"""Fixtures of the end-to-end test: the Docker engine (or a clear failure), the Compose CLI, the figures.

The test never skips for lack of Docker: CI runs it after `scripts/docker-up.sh` and
`scripts/build-base-images.sh`, so an unreachable daemon, a missing base image or a missing Compose CLI
fails at once with a message that says what to run.

The figures a run measured (time to 10 workers, drain time, enqueue latency, redeliveries, ...) are
printed in a section of their own at the end of the session, whatever the capture mode, and written as
JSON to the temporary directory.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGES_ENV = REPO / "scripts" / "images.env"
SETUP_HINT = "run scripts/docker-up.sh and scripts/build-base-images.sh first (scripts/test does both)"
# `export NAME="${NAME:-default}"` lines of scripts/images.env: the local stand-ins for official images.
_IMAGE_LINE = re.compile(r'^export (\w+_IMAGE)="\$\{\w+:-([^}]+)\}"', re.MULTILINE)


@dataclass(frozen=True)
class DockerSetup:
    """What the test needs from the machine, checked once."""

    client: docker.DockerClient
    compose: tuple[str, ...]
    images: dict[str, str]
    socket_gid: int


@dataclass
class Figures:
    """What the run measured, printed at the end of the session and written to `path` as JSON."""

    values: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def record(self, **values: Any) -> None:
        self.values.update(values)
        if self.path is not None:
            self.path.write_text(json.dumps(self.values, indent=2, default=str) + "\n")


_FIGURES = Figures()
# Hundreds of entries each (every sample of the timeline, every request): in the JSON file only.
JSON_ONLY = frozenset({"timeline", "posts", "burst_at_s"})


def image_defaults() -> dict[str, str]:
    """PYTHON_IMAGE, REDIS_IMAGE, POSTGRES_IMAGE: the environment's values, else scripts/images.env's."""
    defaults = dict(_IMAGE_LINE.findall(IMAGES_ENV.read_text()))
    return {name: os.environ.get(name) or value for name, value in defaults.items()}


def _compose_command() -> tuple[str, ...]:
    if shutil.which("docker-compose"):
        return ("docker-compose",)
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if probe.returncode == 0:
        return ("docker", "compose")
    pytest.fail(f"neither `docker-compose` nor `docker compose` is installed; {SETUP_HINT}", pytrace=False)


def _socket_gid() -> int:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    path = Path(host.removeprefix("unix://")) if host.startswith("unix://") else Path("/var/run/docker.sock")
    try:
        return path.stat().st_gid
    except OSError as exc:
        pytest.fail(f"the autoscaler container mounts {path}, which is not there ({exc}); {SETUP_HINT}", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def docker_setup() -> Iterator[DockerSetup]:
    """The engine, the base images and the Compose CLI: every test here fails at once, clearly, without them."""
    error = None
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except docker.errors.DockerException as exc:
        error = str(exc)
    if error is not None:
        # The failed attempt leaves an unclosed socket behind; finalise it here, quietly, so that the one
        # message below is the whole report (not a ResourceWarning turned error at the end of the session).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        pytest.fail(f"the Docker engine at {host} is not reachable ({error}); {SETUP_HINT}", pytrace=False)
    images = image_defaults()
    for tag in images.values():
        try:
            client.images.get(tag)
        except docker.errors.ImageNotFound:
            pytest.fail(
                f"base image {tag} is missing (nothing is pulled: no registry is reachable); {SETUP_HINT}",
                pytrace=False,
            )
    yield DockerSetup(client=client, compose=_compose_command(), images=images, socket_gid=_socket_gid())
    client.close()


@pytest.fixture(scope="session")
def figures() -> Figures:
    """Where a test records its measurements for the end-of-session summary (and the JSON file)."""
    _FIGURES.path = Path(tempfile.gettempdir()) / f"autoscaler-e2e-{os.getpid()}.json"
    return _FIGURES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the figures, one per line, in their own section (shown with or without -s)."""
    if not _FIGURES.values:
        return
    terminalreporter.section("autoscaler end-to-end figures")
    for name, value in _FIGURES.values.items():
        if name in JSON_ONLY:
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        terminalreporter.write_line(f"{name}: {text}")
    if _FIGURES.path is not None:
        terminalreporter.write_line(f"(all figures and the sampled timeline: {_FIGURES.path})")
