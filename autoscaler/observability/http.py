"""The HTTP endpoint: /metrics for Prometheus, /healthz (alive), /readyz (leader or standby, fresh tick)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from autoscaler.observability.metrics import Metrics

__all__ = ["HealthServer"]


class HealthServer:
    """Serves the endpoints from a daemon thread. `readiness()` returns (ready, details)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        metrics: Metrics,
        readiness: Callable[[], tuple[bool, dict[str, Any]]],
    ) -> None:
        handler = _make_handler(metrics, readiness)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="health-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _make_handler(
    metrics: Metrics, readiness: Callable[[], tuple[bool, dict[str, Any]]]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b'{"status":"alive"}\n', "application/json")
            elif path == "/readyz":
                ready, details = readiness()
                body = json.dumps({"ready": ready, **details}).encode() + b"\n"
                self._send(200 if ready else 503, body, "application/json")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: ARG002 - the stdlib's signature
            return None  # scrapes every few seconds would drown the decision log

    return Handler
