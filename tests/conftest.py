"""Shared fixtures: a real redis-server per test session, a clean database per test.

Also the guard `.ci/run` turns on with AUTOSCALER_REQUIRE_DOCKER=1: the run fails if any test marked
`docker` was deselected (`-m`, `-k`) or skipped, or if none ran, so that a green CI always includes the
Docker end-to-end tests. A skip whose reason starts with "opt-in:" is allowed (and listed).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from loguru import logger

OPT_IN_PREFIX = "opt-in:"
_docker_tests: dict[str, list[str]] = {"ran": [], "deselected": [], "skipped": [], "opted_out": []}


def _requires_docker() -> bool:
    return os.environ.get("AUTOSCALER_REQUIRE_DOCKER") == "1"


def pytest_deselected(items: list[pytest.Item]) -> None:
    _docker_tests["deselected"].extend(item.nodeid for item in items if item.get_closest_marker("docker"))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "docker" not in report.keywords:
        return
    if report.skipped:
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        kind = "opted_out" if reason.removeprefix("Skipped: ").startswith(OPT_IN_PREFIX) else "skipped"
        _docker_tests[kind].append(f"{report.nodeid} ({reason})")
    elif report.when == "call":
        _docker_tests["ran"].append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _requires_docker() or exitstatus not in (0, 1):
        return
    problems = []
    if _docker_tests["deselected"]:
        problems.append(f"{len(_docker_tests['deselected'])} Docker test(s) deselected")
    if _docker_tests["skipped"]:
        problems.append(f"{len(_docker_tests['skipped'])} Docker test(s) skipped: {_docker_tests['skipped']}")
    if not _docker_tests["ran"]:
        problems.append("no Docker test ran")
    if problems:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.section("Docker tests (AUTOSCALER_REQUIRE_DOCKER=1)")
        reporter.write_line(f"{len(_docker_tests['ran'])} ran")
        for line in _docker_tests["opted_out"]:
            reporter.write_line(f"opt-in, not run here: {line}")
        for problem in problems:
            reporter.write_line(f"FAILED: {problem}", red=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """A redis-server process started by the tests; `stop()`/`start()` simulate an outage."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server); .ci/run installs it")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, socket_timeout=0.5).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        pytest.fail(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(port=self.port, db=db)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), workdir=tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A URL to an empty database on the session's redis-server (flushed before each test)."""
    if redis_server.proc is None:  # a previous test stopped it
        redis_server.start()
    client = redis_server.client()
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """The controller's log messages (INFO and up) while the test runs, one string each."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m).strip()), level="INFO", format="{message}")
    yield lines
    logger.remove(sink)
