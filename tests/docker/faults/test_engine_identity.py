"""The dockerd-restart fault stops only the daemon serving the socket (issue 18, 5).

Read-only against this machine: nothing is stopped here. A process named dockerd that does not serve the
socket (a copy of `sleep` under that name) is never taken for the engine, whatever its pid file says.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine import PID_FILE, SOCKET, daemon_serving

pytestmark = pytest.mark.docker


@pytest.fixture
def impostor(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process named dockerd that serves nothing."""
    sleep = shutil.which("sleep")
    assert sleep is not None
    fake = tmp_path / "dockerd"
    shutil.copy(sleep, fake)
    process = subprocess.Popen([str(fake), "300"])
    try:
        yield process
    finally:
        process.kill()
        process.wait(timeout=10)


@pytest.mark.skipif(os.geteuid() != 0, reason="reading dockerd's file descriptors needs root")
def test_the_daemon_is_the_one_holding_the_socket(impostor: subprocess.Popen[bytes], tmp_path: Path) -> None:
    if not Path(PID_FILE).exists():
        pytest.skip(f"this engine writes no {PID_FILE}")
    real = int(Path(PID_FILE).read_text())
    assert daemon_serving() == real
    lying = tmp_path / "docker.pid"
    lying.write_text(f"{impostor.pid}\n")
    assert Path(f"/proc/{impostor.pid}/comm").read_text().strip() == "dockerd"
    assert daemon_serving(pid_file=str(lying)) is None
    lying.write_text(f"{os.getpid()}\n")  # not a dockerd at all
    assert daemon_serving(pid_file=str(lying)) is None
    assert daemon_serving(socket_path=str(tmp_path / "elsewhere.sock")) is None
    assert daemon_serving(pid_file=str(tmp_path / "missing.pid")) is None
    assert SOCKET == "/var/run/docker.sock"
