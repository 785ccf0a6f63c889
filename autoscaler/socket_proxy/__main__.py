"""`python -m autoscaler.socket_proxy`: the socket proxy, configured from its environment.

AUTOSCALER_PROXY_PROJECTS   the Compose projects it serves, comma-separated
AUTOSCALER_PROXY_STACKS     the Swarm stacks it serves, comma-separated; both unset: its own container's
                            project or stack (its com.docker.compose.project or com.docker.stack.namespace)
AUTOSCALER_PROXY_USER       a uid to become when started as root, keeping only the socket's group (Swarm:
                            a stack file has no group_add; autoscaler.socket_proxy.privileges)
AUTOSCALER_PROXY_LISTEN     host:port to listen on (default 0.0.0.0:2375)
AUTOSCALER_PROXY_ENGINE     the engine: unix:///var/run/docker.sock (default) or tcp://host:port
AUTOSCALER_PROXY_MAX_STOP   the longest stop grace it passes, in seconds (default 7200): a stop's answer
                            is waited for this long, plus a minute
AUTOSCALER_PROXY_BODY_TIMEOUT  seconds a request's body may take to arrive (default 10); later: refused
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time

from autoscaler.clone_spec import PROJECT_LABEL
from autoscaler.socket_proxy.calls import Context
from autoscaler.socket_proxy.engine import Engine, EngineError
from autoscaler.socket_proxy.judge import Judge
from autoscaler.socket_proxy.privileges import PrivilegeError, drop_privileges
from autoscaler.socket_proxy.request import BODY_TIMEOUT
from autoscaler.socket_proxy.server import ProxyServer
from autoscaler.socket_proxy.services import STACK_LABEL

log = logging.getLogger("autoscaler.socket_proxy")
OWN_PROJECT_WAIT = 60.0


def own_labels(engine: Engine) -> dict[str, str]:
    """The labels of the container this process runs in (its hostname is the container's id)."""
    deadline = time.monotonic() + OWN_PROJECT_WAIT
    while True:
        try:
            status, info = engine.get_json(f"/containers/{socket.gethostname()}/json")
        except EngineError as exc:
            status, info = 0, None
            log.warning("cannot read this container's labels yet: %s", exc)
        if status == 200 and isinstance(info, dict):
            return {str(k): str(v) for k, v in (info.get("Config", {}).get("Labels") or {}).items()}
        if status == 404 or time.monotonic() > deadline:
            return {}
        time.sleep(2)


def _names(variable: str) -> frozenset[str]:
    return frozenset(p.strip() for p in os.environ.get(variable, "").split(",") if p.strip())


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s socket-proxy %(message)s")
    max_stop = int(os.environ.get("AUTOSCALER_PROXY_MAX_STOP", "7200"))
    engine = Engine(os.environ.get("AUTOSCALER_PROXY_ENGINE", "unix:///var/run/docker.sock"),
                    call_timeout=max_stop + 60.0)
    run_as = os.environ.get("AUTOSCALER_PROXY_USER", "")
    if run_as:
        try:
            group = drop_privileges(int(run_as), engine.address.removeprefix("unix://")
                                    if engine.address.startswith("unix://") else None)
        except (PrivilegeError, OSError, ValueError) as exc:
            log.error("%s", exc)  # noqa: TRY400 (the reason is the message; no traceback)
            return 2
        log.info("running as uid %d, groups %s (the socket's group: %s)", os.getuid(), os.getgroups(), group)
    projects, stacks = _names("AUTOSCALER_PROXY_PROJECTS"), _names("AUTOSCALER_PROXY_STACKS")
    if not projects and not stacks:
        labels = own_labels(engine)
        projects = frozenset(filter(None, [labels.get(PROJECT_LABEL)]))
        stacks = frozenset(filter(None, [labels.get(STACK_LABEL)]))
        if not projects and not stacks:
            log.error("nothing to serve: set AUTOSCALER_PROXY_PROJECTS or AUTOSCALER_PROXY_STACKS, or run the "
                      "proxy as a Compose service or in a Swarm stack")
            return 2
    host, _, port = os.environ.get("AUTOSCALER_PROXY_LISTEN", "0.0.0.0:2375").rpartition(":")
    judge = Judge(engine, Context(projects=projects, max_stop_seconds=max_stop, stacks=stacks))
    body_timeout = float(os.environ.get("AUTOSCALER_PROXY_BODY_TIMEOUT", str(BODY_TIMEOUT)))
    with ProxyServer((host, int(port)), judge=judge, engine=engine, body_timeout=body_timeout) as server:
        log.info("serving Compose projects %s and Swarm stacks %s on %s:%s, engine %s",
                 ", ".join(sorted(projects)) or "(none)", ", ".join(sorted(stacks)) or "(none)", host, port,
                 engine.address)
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
