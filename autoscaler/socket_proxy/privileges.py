"""Dropping from root to an unprivileged user that keeps only the Docker socket's group.

For Swarm: a stack file cannot add a group (`group_add` is not in the stack file format), and the socket's
group id may differ from one manager node to the next, so no fixed `user: uid:gid` fits every node. The
proxy's task starts as root with every capability dropped but SETUID and SETGID (deploy/swarm-stack.yaml),
reads the group of the socket it finds on its own node, and becomes `uid` with that group as its only
supplementary one, before it opens any connection. Then no_new_privs: nothing it could exec regains root
(the stack file format has no `security_opt: no-new-privileges`). Changing uid from 0 to another clears the
process's permitted and effective capabilities, so what is left is an ordinary user in the socket's group.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["PrivilegeError", "drop_privileges"]

_PR_SET_NO_NEW_PRIVS = 38


class PrivilegeError(RuntimeError):
    """The drop could not be made, or did not hold."""


def drop_privileges(uid: int, socket_path: str | None) -> int | None:
    """Become `uid` (gid `uid`) with the socket's group; the group id, or None without a socket to reach."""
    if os.getuid() != 0:
        if os.getuid() != uid:
            raise PrivilegeError(f"asked to run as uid {uid}, but started as uid {os.getuid()}, not root")
        return None
    if uid == 0:
        raise PrivilegeError("refusing to stay root: AUTOSCALER_PROXY_USER must name another uid")
    group = os.stat(socket_path).st_gid if socket_path else None
    try:
        os.setgroups([] if group is None else [group])
        os.setgid(uid)
        os.setuid(uid)
    except OSError as exc:
        raise PrivilegeError(f"could not become uid {uid}: {exc} (the task needs CAP_SETUID and CAP_SETGID)") from exc
    libc = ctypes.CDLL(None, use_errno=True)  # the process itself: libc is linked in
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise PrivilegeError(f"prctl(PR_SET_NO_NEW_PRIVS): errno {ctypes.get_errno()}")
    try:
        os.setuid(0)
    except PermissionError:
        return group
    raise PrivilegeError(f"became root again after dropping to uid {uid}: refusing to run")
