"""The proxy's own line to the Engine API: lookups it makes to judge a request, and the requests it forwards.

Every connection carries one request with `Connection: close`, so an answer ends when the engine closes,
and it is relayed as it comes (an events stream, a stop held for its grace) without being re-framed.
"""

from __future__ import annotations

import json
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Any

__all__ = ["CONNECT_TIMEOUT", "LOOKUP_TIMEOUT", "Engine", "EngineAnswer", "EngineError"]

CONNECT_TIMEOUT = 5.0
LOOKUP_TIMEOUT = 30.0


class EngineError(RuntimeError):
    """The engine could not be reached or gave an answer the proxy cannot read."""


@dataclass(frozen=True, slots=True)
class EngineAnswer:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True, slots=True)
class Engine:
    """Where the engine listens: `unix:///var/run/docker.sock` or `tcp://host:port` (a test stand-in)."""

    address: str
    call_timeout: float  # a forwarded call's answer: the longest stop grace, plus margin

    def connect(self, timeout: float) -> socket.socket:
        if self.address.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(CONNECT_TIMEOUT)
            try:
                sock.connect(self.address.removeprefix("unix://"))
            except OSError:
                sock.close()
                raise
        elif self.address.startswith("tcp://"):
            host, _, port = self.address.removeprefix("tcp://").rpartition(":")
            sock = socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT)
        else:
            raise EngineError(f"engine address {self.address!r} is neither unix:// nor tcp://")
        sock.settimeout(timeout)
        return sock

    def get(self, path: str, query: dict[str, str] | None = None) -> EngineAnswer:
        """A lookup of the proxy's own (inspect, list): the whole answer, de-chunked."""
        target = path + ("?" + urllib.parse.urlencode(query) if query else "")
        try:
            with self.connect(LOOKUP_TIMEOUT) as sock:
                sock.sendall(request_bytes("GET", target, None))
                return _read_answer(sock)
        except (OSError, ValueError) as exc:
            raise EngineError(f"GET {path}: {exc}") from exc

    def get_json(self, path: str, query: dict[str, str] | None = None) -> tuple[int, Any]:
        answer = self.get(path, query)
        if answer.status != 200:
            return answer.status, None
        try:
            return 200, answer.json()
        except ValueError as exc:
            raise EngineError(f"GET {path}: the engine's answer is not JSON ({exc})") from exc


def request_bytes(method: str, target: str, body: bytes | None) -> bytes:
    """The request the proxy sends: built here from judged parts, never copied from the client."""
    lines = [f"{method} {target} HTTP/1.1", "Host: docker", "Connection: close", "User-Agent: autoscaler-socket-proxy"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    elif method == "POST":
        lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (body or b"")


def _read_answer(sock: socket.socket) -> EngineAnswer:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    head, separator, body = bytes(data).partition(b"\r\n\r\n")
    if not separator:
        raise ValueError("the engine closed before a whole answer")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return EngineAnswer(status, body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    position = 0
    while True:
        line_end = data.index(b"\r\n", position)
        size = int(data[position:line_end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        start = line_end + 2
        out += data[start : start + size]
        position = start + size + 2
