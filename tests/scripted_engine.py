"""A scripted Docker Engine on a unix socket: just enough of the Engine API for the Compose backend's drains.

Only for what cannot be made to happen on the real engine on demand and deterministically: a stop that
blocks until the test says the worker has exited (a busy Celery worker's warm shutdown of ten minutes, with
the test's own clock), and an event stream that never ends. The backend talks to it through the real
`DockerConnection` and docker-py, so every call crosses HTTP as it would to dockerd.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socketserver
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

_VERSIONED = re.compile(r"^/v[0-9.]+(/.*)$")


@dataclass
class Stop:
    container: str
    grace: int  # the `t` the client asked for
    at: float  # the test clock when the engine received it (when SIGTERM would be sent)
    done: threading.Event = field(default_factory=threading.Event)


class ScriptedEngine:
    """Containers of one Compose service, stops that wait for `finish`, and `/events` that never ends."""

    def __init__(self, *, clock: Callable[[], float], project: str = "p", service: str = "worker",
                 pool: str = "fast") -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.labels = {"com.docker.compose.project": project, "com.docker.compose.service": service,
                       "autoscaler.pool": pool}
        self.containers: dict[str, dict[str, Any]] = {}
        self.stops: list[Stop] = []
        self.events_requests = 0
        self.events_chatty = True  # unrelated events every 0.2 s; False: silence, the stream held open
        self._dir = tempfile.mkdtemp(prefix="scripted-engine-")
        self.socket_path = os.path.join(self._dir, "docker.sock")
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                engine._route(self, "GET")

            def do_POST(self) -> None:
                engine._route(self, "POST")

            def do_DELETE(self) -> None:
                engine._route(self, "DELETE")

        class Server(socketserver.ThreadingUnixStreamServer):
            request_queue_size = 512  # dozens of stops connect at once
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                return None  # a client gone before its answer (a controller that exited mid-stop) is expected

        self._server = Server(self.socket_path, Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def add_running(self, count: int) -> list[str]:
        ids = []
        with self._lock:
            for n in range(len(self.containers) + 1, len(self.containers) + count + 1):
                cid = f"{n:02d}".ljust(64, "c")
                self.containers[cid] = {
                    "Id": cid, "Names": [f"/p-worker-{n}"], "State": "running", "Status": "Up",
                    "Created": 1_000 + n, "Labels": {**self.labels, "com.docker.compose.container-number": str(n)},
                }
                ids.append(cid)
        return ids

    def received(self) -> list[Stop]:
        with self._lock:
            return list(self.stops)

    def finish(self, stops: list[Stop]) -> None:
        """These workers have exited: their stop requests answer."""
        with self._lock:
            for stop in stops:
                if stop.container in self.containers:
                    self.containers[stop.container]["State"] = "exited"
        for stop in stops:
            stop.done.set()

    def close(self) -> None:
        self.finish(self.received())
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)
            os.rmdir(self._dir)

    # -- the API ----------------------------------------------------------------------------------------

    def _route(self, request: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(request.path)
        path = m.group(1) if (m := _VERSIONED.match(url.path)) else url.path
        query = parse_qs(url.query)
        length = int(request.headers.get("Content-Length") or 0)
        if length:
            request.rfile.read(length)
        parts = path.strip("/").split("/")
        if method == "GET" and path in ("/version", "/_ping"):
            self._answer(request, 200, {"ApiVersion": "1.41", "Version": "scripted"} if path == "/version" else "OK")
        elif method == "GET" and path == "/containers/json":
            with self._lock:
                listing = list(self.containers.values())
            self._answer(request, 200, listing)
        elif method == "GET" and parts[0] == "containers" and parts[-1] == "json":
            with self._lock:
                found = self.containers.get(parts[1])
            if found is None:
                self._answer(request, 404, {"message": f"No such container: {parts[1]}"})
            else:
                self._answer(request, 200, {"Id": found["Id"], "Name": found["Names"][0], "Config": {
                    "Labels": found["Labels"], "Hostname": found["Id"][:12]}, "State": {"Status": found["State"]},
                    "HostConfig": {}})
        elif method == "POST" and parts[0] == "containers" and parts[-1] == "stop":
            self._stop(request, parts[1], int(query.get("t", ["10"])[0]))
        elif method == "DELETE" and parts[0] == "containers":
            with self._lock:
                gone = self.containers.pop(parts[1], None)
            self._answer(request, 204 if gone else 404, None if gone else {"message": "No such container"})
        elif method == "GET" and path == "/events":
            self._endless_events(request)
        else:
            self._answer(request, 404, {"message": f"scripted engine: no {method} {path}"})

    def _stop(self, request: BaseHTTPRequestHandler, cid: str, grace: int) -> None:
        with self._lock:
            known = cid in self.containers
            stop = Stop(cid, grace, self._clock())
            if known:
                self.stops.append(stop)
        if not known:
            self._answer(request, 404, {"message": f"No such container: {cid}"})
            return
        stop.done.wait()
        self._answer(request, 204, None)

    def _endless_events(self, request: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.events_requests += 1
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Transfer-Encoding", "chunked")
        request.end_headers()
        with contextlib.suppress(OSError):
            for _ in self._forever():
                # A daemon that neither ends the stream nor sends an oom event.
                if not self.events_chatty:
                    threading.Event().wait(0.2)
                    continue
                chunk = json.dumps({"Type": "container", "Action": "exec_start", "id": "x"}).encode() + b"\n"
                request.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                request.wfile.flush()
                threading.Event().wait(0.2)

    def _forever(self) -> Iterator[int]:
        n = 0
        while True:
            n += 1
            yield n

    @staticmethod
    def _answer(request: BaseHTTPRequestHandler, status: int, body: Any) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        request.send_response(status)
        if data:
            request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if data:
            request.wfile.write(data)
