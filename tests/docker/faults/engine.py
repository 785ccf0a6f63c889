"""Which dockerd serves this engine's socket: the one process the dockerd-restart fault may stop.

A machine may run more than one process named dockerd (another engine under its own socket, a
rootless one, a nested one in a CI container): stopping "the oldest dockerd" stopped whichever that was.
The daemon is named by its pid file, and trusted only if that process is a dockerd and holds the listening
socket at the path clients use (/proc/net/unix gives the socket's inode, /proc/<pid>/fd its holders).
"""

from __future__ import annotations

import os
from pathlib import Path

SOCKET = "/var/run/docker.sock"
PID_FILE = "/var/run/docker.pid"
_LISTENING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags column


def listening_inodes(socket_path: str, proc: Path = Path("/proc")) -> set[str]:
    """The inodes of the listening Unix sockets bound at `socket_path` (as bound, or through symlinks)."""
    wanted = {socket_path, os.path.realpath(socket_path)}
    found = set()
    for line in (proc / "net" / "unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and int(fields[3], 16) & _LISTENING and (
            fields[7] in wanted or os.path.realpath(fields[7]) in wanted
        ):
            found.add(fields[6])
    return found


def daemon_serving(socket_path: str = SOCKET, pid_file: str = PID_FILE, proc: Path = Path("/proc")) -> int | None:
    """The pid in `pid_file` if that process is a dockerd listening on `socket_path`; None otherwise."""
    try:
        pid = int(Path(pid_file).read_text().strip())
        if (proc / str(pid) / "comm").read_text().strip() != "dockerd":
            return None
        held = {os.readlink(fd) for fd in (proc / str(pid) / "fd").iterdir() if fd.is_symlink()}
    except (OSError, ValueError):
        return None
    inodes = listening_inodes(socket_path, proc)
    return pid if any(f"socket:[{inode}]" in held for inode in inodes) else None
