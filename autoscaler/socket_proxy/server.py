"""The proxy's server: a thread per connection, one request per connection, every refusal answered and logged.

Threads, not an event loop: a stop holds its connection for the replica's whole grace (minutes), and the
autoscaler sends every victim's stop at once (a scale-down of a large pool can hold hundreds). MAX_CONNECTIONS
bounds them; an idle thread costs ~40 KiB here (512 of them: 22 MB of RSS), so the bound is set well above any
scale-down a policy is likely to make, and a stop beyond it is refused and tried again at the next tick.
A forwarded call's answer is relayed as the engine sends it, with no timeout shorter than the longest stop
grace the proxy allows.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading

from autoscaler.socket_proxy.engine import Engine, EngineAnswer, EngineError, request_bytes
from autoscaler.socket_proxy.judge import Forward, Judge, RefusedError
from autoscaler.socket_proxy.request import BODY_TIMEOUT, HttpRefusedError, read_request

__all__ = ["MAX_CONNECTIONS", "ProxyServer", "answer_bytes"]

MAX_CONNECTIONS = 1024
_MUTATING = frozenset({"POST", "DELETE"})
log = logging.getLogger("autoscaler.socket_proxy")


def answer_bytes(status: int, reason: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode("ascii") + body


def refusal_bytes(message: str) -> bytes:
    return answer_bytes(403, "Forbidden", f"socket proxy: {message}".encode())


class _Handler(socketserver.BaseRequestHandler):
    server: ProxyServer

    def handle(self) -> None:
        conn: socket.socket = self.request
        peer = f"{self.client_address[0]}" if isinstance(self.client_address, tuple) else "?"
        if not self.server.slots.acquire(blocking=False):
            self._refuse(conn, peer, "?", f"more than {MAX_CONNECTIONS} connections at once")
            return
        try:
            self._serve(conn, peer)
        finally:
            self.server.slots.release()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        try:
            request = read_request(conn, body_timeout=self.server.body_timeout)
        except HttpRefusedError as exc:
            self._refuse(conn, peer, "(unparsed request)", str(exc))
            return
        except OSError:
            return
        if request is None:
            return
        what = f"{request.method} {request.target[:200]}"
        try:
            decision = self.server.judge.judge(request)
        except RefusedError as exc:
            self._refuse(conn, peer, what, str(exc))
            return
        except (EngineError, OSError, ValueError) as exc:
            log.error(  # noqa: TRY400 (the reason is the message; no traceback)
                "%s: 502 %s: the engine failed a lookup: %s", peer, what, exc)
            _send(conn, answer_bytes(502, "Bad Gateway", f"socket proxy: engine lookup failed: {exc}".encode()))
            return
        if isinstance(decision, EngineAnswer):
            log.info("%s: %s: the engine answered %d to the proxy's lookup", peer, what, decision.status)
            _send(conn, answer_bytes(decision.status, "Not Found" if decision.status == 404 else "Error",
                                     decision.body, "application/json"))
            return
        self._forward(conn, peer, decision)

    def _forward(self, conn: socket.socket, peer: str, forward: Forward) -> None:
        level = logging.INFO if forward.method in _MUTATING else logging.DEBUG
        log.log(level, "%s: %s: %s %s", peer, forward.name, forward.method, forward.target[:200])
        try:
            engine = self.server.engine.connect(self.server.engine.call_timeout)
        except OSError as exc:
            log.error(  # noqa: TRY400 (the reason is the message; no traceback)
                "%s: 502 %s: cannot reach the engine: %s", peer, forward.name, exc)
            _send(conn, answer_bytes(502, "Bad Gateway", f"socket proxy: cannot reach the engine: {exc}".encode()))
            return
        with engine:
            try:
                # A slow reader of an events stream or of a long stop's answer is not cut short either.
                conn.settimeout(self.server.engine.call_timeout)
                engine.sendall(request_bytes(forward.method, forward.target, forward.body))
                while chunk := engine.recv(65536):
                    conn.sendall(chunk)
            except OSError as exc:
                log.warning("%s: %s cut short: %s", peer, forward.name, exc)

    def _refuse(self, conn: socket.socket, peer: str, what: str, reason: str) -> None:
        log.warning("%s: refused 403 %s: %s", peer, what, reason)
        _send(conn, refusal_bytes(reason))


def _send(conn: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        conn.settimeout(10)
        conn.sendall(data)
        # Let a client still sending (a refused body it had not finished) read the answer, not a reset.
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass


class ProxyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512  # every stop of a scale-down arrives at once

    def __init__(self, address: tuple[str, int], *, judge: Judge, engine: Engine,
                 body_timeout: float = BODY_TIMEOUT) -> None:
        self.judge = judge
        self.engine = engine
        self.body_timeout = body_timeout
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)
