"""A TCP -> Docker socket relay that records each request and can hold the engine's answers.

Given to one controller process as its DOCKER_HOST, it shows exactly which Engine API calls that process
made and when, and lets a test freeze the process in the middle of a call: once `hold_after(pattern)`
sees a matching request, it still forwards every request to the engine but keeps every answer back until
`release()`.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from dataclasses import dataclass, field

_REQUEST_LINE = re.compile(rb"(GET|POST|PUT|DELETE|HEAD) (\S+) HTTP/1\.[01]\r\n")


@dataclass
class Request:
    at: float  # time.time() when the relay saw it
    method: str
    path: str


@dataclass
class RecordingProxy:
    socket_path: str = "/var/run/docker.sock"
    requests: list[Request] = field(default_factory=list)
    streams: list[bytearray] = field(default_factory=list)  # every byte each connection sent, in order

    def __post_init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._lock = threading.Lock()
        self._hold_pattern: re.Pattern[str] | None = None
        self._holding = threading.Event()
        self._released = threading.Event()
        self._released.set()
        self.held = threading.Event()  # set once a request matched and answers are being held
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def hold_after(self, pattern: str) -> None:
        with self._lock:
            self._hold_pattern = re.compile(pattern)
            self._released.clear()

    def release(self) -> None:
        self._released.set()

    def since(self, moment: float) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.at >= moment]

    def close(self) -> None:
        self._closing = True
        self._released.set()
        self._server.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            engine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            engine.connect(self.socket_path)
            stream = bytearray()
            with self._lock:
                self.streams.append(stream)
            threading.Thread(target=self._upstream, args=(client, engine, stream), daemon=True).start()
            threading.Thread(target=self._downstream, args=(engine, client), daemon=True).start()

    def _upstream(self, client: socket.socket, engine: socket.socket, stream: bytearray) -> None:
        try:
            while data := client.recv(65536):
                stream += data
                for match in _REQUEST_LINE.finditer(data):
                    request = Request(time.time(), match.group(1).decode(), match.group(2).decode())
                    with self._lock:
                        self.requests.append(request)
                        pattern = self._hold_pattern
                    if pattern is not None and pattern.search(f"{request.method} {request.path}"):
                        self.held.set()
                engine.sendall(data)
        except OSError:
            pass
        finally:
            _shut(engine)

    def _downstream(self, engine: socket.socket, client: socket.socket) -> None:
        try:
            while data := engine.recv(65536):
                if self.held.is_set():
                    self._released.wait()
                client.sendall(data)
        except OSError:
            pass
        finally:
            _shut(client)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
