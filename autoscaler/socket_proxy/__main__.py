"""`python -m autoscaler.socket_proxy`: the socket proxy, configured from its environment.

AUTOSCALER_PROXY_PROJECTS   the Compose projects it serves, comma-separated; unset: its own container's
                            project (the com.docker.compose.project label of the container it runs in)
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
from autoscaler.socket_proxy.request import BODY_TIMEOUT
from autoscaler.socket_proxy.server import ProxyServer

log = logging.getLogger("autoscaler.socket_proxy")
OWN_PROJECT_WAIT = 60.0


def own_project(engine: Engine) -> str | None:
    """The Compose project of the container this process runs in (its hostname is the container's id)."""
    deadline = time.monotonic() + OWN_PROJECT_WAIT
    while True:
        try:
            status, info = engine.get_json(f"/containers/{socket.gethostname()}/json")
        except EngineError as exc:
            status, info = 0, None
            log.warning("cannot read this container's project yet: %s", exc)
        if status == 200 and isinstance(info, dict):
            project = (info.get("Config", {}).get("Labels") or {}).get(PROJECT_LABEL)
            return str(project) if project else None
        if status == 404 or time.monotonic() > deadline:
            return None
        time.sleep(2)


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s socket-proxy %(message)s")
    max_stop = int(os.environ.get("AUTOSCALER_PROXY_MAX_STOP", "7200"))
    engine = Engine(os.environ.get("AUTOSCALER_PROXY_ENGINE", "unix:///var/run/docker.sock"),
                    call_timeout=max_stop + 60.0)
    projects = frozenset(p.strip() for p in os.environ.get("AUTOSCALER_PROXY_PROJECTS", "").split(",") if p.strip())
    if not projects:
        project = own_project(engine)
        if project is None:
            log.error("no project to serve: set AUTOSCALER_PROXY_PROJECTS, or run the proxy as a Compose service")
            return 2
        projects = frozenset({project})
    host, _, port = os.environ.get("AUTOSCALER_PROXY_LISTEN", "0.0.0.0:2375").rpartition(":")
    judge = Judge(engine, Context(projects=projects, max_stop_seconds=max_stop))
    body_timeout = float(os.environ.get("AUTOSCALER_PROXY_BODY_TIMEOUT", str(BODY_TIMEOUT)))
    with ProxyServer((host, int(port)), judge=judge, engine=engine, body_timeout=body_timeout) as server:
        log.info("serving Compose projects %s on %s:%s, engine %s", ", ".join(sorted(projects)), host, port,
                 engine.address)
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
