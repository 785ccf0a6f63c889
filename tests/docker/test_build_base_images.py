"""scripts/build-base-images.sh when debootstrap fails: it says why, instead of ending silently.

Under `set -o pipefail`, looking for a fallback mirror in a host apt configuration that has none used to end
the script right there, with status 1 and nothing on the terminal: the debootstrap log that says what went
wrong was never shown. debootstrap is the one part replaced here (a failing one on PATH: a real failure
needs a broken network); the engine is the real one and nothing in it is touched (the image cache is a
temporary directory, so the script goes straight to debootstrap).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
FAILING_DEBOOTSTRAP = """#!/bin/sh
echo "$@" >>"$(dirname "$0")/calls"
echo "I: Retrieving InRelease"
echo "E: Failed getting release file http://mirror.invalid/debian/dists/bookworm/Release (debootstrap-test)"
exit 1
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the script builds as root (debootstrap, docker import)")
@pytest.mark.parametrize("host_mirror", [None, "http://mirror.example/debian"], ids=["no-host-mirror", "host-mirror"])
def test_a_failing_debootstrap_is_reported_with_its_log(tmp_path: Path, host_mirror: str | None) -> None:
    """With no mirror of the host's to retry with (the case that ended silently), and with one."""
    apt_dir = tmp_path / "apt"
    (apt_dir / "sources.list.d").mkdir(parents=True)
    if host_mirror:
        (apt_dir / "sources.list.d" / "debian.sources").write_text(
            f"Types: deb\nURIs: {host_mirror}\nSuites: bookworm\nComponents: main\n"
        )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "debootstrap").write_text(FAILING_DEBOOTSTRAP)
    (bin_dir / "debootstrap").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "AUTOSCALER_IMAGE_CACHE": str(tmp_path / "cache"),
        "AUTOSCALER_HOST_APT_DIR": str(apt_dir),
        # Names nobody uses: the script must not see (or replace) the real stand-ins.
        "PYTHON_IMAGE": "astest-bbi/python:absent",
        "PYTHON_BUILD_IMAGE": "astest-bbi/python:absent-build",
    }
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-base-images.sh"), "python"],
        env=env, capture_output=True, text=True, timeout=100, check=False,
    )
    assert result.returncode != 0
    assert "Failed getting release file" in result.stderr, result.stderr
    calls = (bin_dir / "calls").read_text().splitlines()
    assert len(calls) == (2 if host_mirror else 1), calls
    if host_mirror:
        assert calls[1].endswith(host_mirror)
