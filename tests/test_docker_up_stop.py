"""scripts/docker-up.sh stops only the dockerd it started (issue 18, 5).

Its retry branch (the daemon it started did not come up with the default storage driver) used to SIGTERM
every process named dockerd on the machine, another engine's or a container's included. The branch runs
only when no engine answers, so here its function runs alone, in a PID namespace of its own (nothing outside
it can be signalled, whatever the function does), against stand-ins: copies of `sleep` named dockerd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "docker-up.sh"

RUN = r"""
set -u
. "$REPO/scripts/lib.sh"
eval "$(sed -n '/^stop_our_dockerd() {/,/^}/p' "$REPO/scripts/docker-up.sh")"
"$FAKE" 300 & ours=$!
"$FAKE" 300 & other=$!
sleep 300 & not_dockerd=$!
case "$CASE" in
    ours) echo "$ours" >"$DOCKERD_PIDFILE" ;;
    not-dockerd) echo "$not_dockerd" >"$DOCKERD_PIDFILE" ;;
    garbage) echo "12 34" >"$DOCKERD_PIDFILE" ;;
    none) rm -f "$DOCKERD_PIDFILE" ;;
esac
stop_our_dockerd
sleep 0.2
for name in ours other not_dockerd; do
    pid=${!name}
    state=$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null || echo gone)  # a zombie (Z) is gone too
    case "$state" in gone|Z) echo "$name gone" ;; *) echo "$name alive" ;; esac
done
kill "$ours" "$other" "$not_dockerd" 2>/dev/null
"""


def _alone(tmp_path: Path, case: str) -> list[str]:
    fake = tmp_path / "dockerd"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", fake)
    env = {"PATH": os.environ["PATH"], "REPO": str(REPO), "FAKE": str(fake), "CASE": case,
           "DOCKERD_PIDFILE": str(tmp_path / "docker.pid")}
    proc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "bash", "-c", RUN], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("\n")[:3]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="a PID namespace of its own needs root and unshare")
@pytest.mark.parametrize(("case", "expected"), [
    ("ours", ["ours gone", "other alive", "not_dockerd alive"]),
    ("not-dockerd", ["ours alive", "other alive", "not_dockerd alive"]),
    ("garbage", ["ours alive", "other alive", "not_dockerd alive"]),
    ("none", ["ours alive", "other alive", "not_dockerd alive"]),
])
def test_only_the_daemon_of_the_pid_file_is_stopped(tmp_path: Path, case: str, expected: list[str]) -> None:
    assert _alone(tmp_path, case) == expected


def test_the_started_daemon_writes_that_pid_file() -> None:
    start = SCRIPT.read_text().split("start_dockerd() {", 1)[1].split("\n}", 1)[0]
    assert 'dockerd --pidfile "$DOCKERD_PIDFILE"' in start
