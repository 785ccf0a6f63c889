"""Reading one HTTP/1.1 request strictly, whole, within bounds: the only framing the proxy accepts.

A request is a request line, at most MAX_HEADER_LINES header lines within MAX_HEAD_BYTES, and a body of
exactly Content-Length bytes (at most MAX_BODY_BYTES). Everything that lets two parsers disagree about where
a request or its body ends is refused instead of interpreted: Transfer-Encoding (chunked bodies included:
the Docker client never sends one to the calls allowed), two Content-Length headers, a Content-Length that
is not plain digits, obs-fold continuation lines, bare CR or LF, a version other than HTTP/1.1, bytes after
the body (a pipelined request), and a body that does not arrive within BODY_TIMEOUT (nothing is forwarded).

One request per connection: the proxy answers it (or relays the engine's answer) and closes.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass

__all__ = [
    "BODY_TIMEOUT",
    "HEAD_TIMEOUT",
    "MAX_BODY_BYTES",
    "MAX_HEADER_LINES",
    "MAX_HEAD_BYTES",
    "HttpRefusedError",
    "Request",
    "parse_head",
    "read_request",
]

MAX_HEAD_BYTES = 16 * 1024
MAX_HEADER_LINES = 100
MAX_BODY_BYTES = 256 * 1024
HEAD_TIMEOUT = 10.0
BODY_TIMEOUT = 10.0

_METHODS = frozenset({"GET", "POST", "DELETE"})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# A request target in origin form: printable ASCII, no spaces, no fragment.
_TARGET = re.compile(r"/[\x21-\x7e]*")
_FIELD_VALUE = re.compile(r"[\x20-\x7e\t]*")
_DIGITS = re.compile(r"[0-9]{1,7}")


class HttpRefusedError(ValueError):
    """The bytes are not a request the proxy accepts; the message says what."""


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str  # path and query, as sent (judged and rebuilt by `calls`, never forwarded as is)
    headers: dict[str, str]  # lowercased names; every name at most once
    body: bytes


def parse_head(head: bytes) -> tuple[str, str, dict[str, str], int]:
    """Method, target, headers and Content-Length of a request head (without its final CRLF CRLF)."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError as exc:
        raise HttpRefusedError(f"non-ASCII byte in the request head at {exc.start}") from None
    lines = text.split("\r\n")
    if any("\r" in line or "\n" in line for line in lines):
        raise HttpRefusedError("bare CR or LF in the request head")
    if len(lines) - 1 > MAX_HEADER_LINES:
        raise HttpRefusedError(f"more than {MAX_HEADER_LINES} header lines")
    method, target = _request_line(lines[0])
    headers: dict[str, str] = {}
    for number, line in enumerate(lines[1:], start=1):
        if line[:1] in (" ", "\t"):
            raise HttpRefusedError(f"header line {number}: obs-fold continuation lines are refused")
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HttpRefusedError(f"header line {number}: not a header field")
        value = value.strip(" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise HttpRefusedError(f"header {name}: control character in its value")
        key = name.lower()
        if key in headers:
            raise HttpRefusedError(f"header {name} given twice")
        headers[key] = value
    return method, target, headers, _content_length(headers)


def _request_line(line: str) -> tuple[str, str]:
    parts = line.split(" ")
    if len(parts) != 3:
        raise HttpRefusedError("the request line is not METHOD TARGET HTTP/1.1")
    method, target, version = parts
    if version != "HTTP/1.1":
        raise HttpRefusedError(f"{version[:20]!r} refused: HTTP/1.1 only")
    if method not in _METHODS:
        raise HttpRefusedError(f"method {method[:20]!r} is not one the autoscaler uses")
    if not _TARGET.fullmatch(target):
        raise HttpRefusedError("the request target is not an absolute path of printable ASCII")
    return method, target


def _content_length(headers: dict[str, str]) -> int:
    if "transfer-encoding" in headers:
        raise HttpRefusedError("Transfer-Encoding (chunked bodies included) is refused: send a Content-Length")
    if "host" not in headers:
        raise HttpRefusedError("no Host header")
    if "expect" in headers:
        raise HttpRefusedError("Expect is refused")
    if "upgrade" in headers:
        raise HttpRefusedError("Upgrade is refused")
    raw = headers.get("content-length")
    if raw is None:
        return 0
    if not _DIGITS.fullmatch(raw):
        raise HttpRefusedError(f"Content-Length {raw[:20]!r} is not a plain number")
    length = int(raw)
    if length > MAX_BODY_BYTES:
        raise HttpRefusedError(f"request body above {MAX_BODY_BYTES // 1024} KiB refused")
    return length


def read_request(conn: socket.socket, *, head_timeout: float = HEAD_TIMEOUT,
                 body_timeout: float = BODY_TIMEOUT) -> Request | None:
    """One whole request from `conn`, or HttpRefusedError (also for a peer that closes or stalls mid-request).

    None: the peer closed without sending a byte (a health check's connect), which is nothing to refuse.
    """
    buffer = bytearray()
    deadline = time.monotonic() + head_timeout
    conn.settimeout(head_timeout)
    try:
        first = conn.recv(65536)
    except TimeoutError:
        raise HttpRefusedError("timed out waiting for the request head: nothing forwarded") from None
    if not first:
        return None
    buffer += first
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise HttpRefusedError(f"request head above {MAX_HEAD_BYTES // 1024} KiB refused")
        _receive(conn, buffer, deadline, "the request head")
    if end > MAX_HEAD_BYTES:
        raise HttpRefusedError(f"request head above {MAX_HEAD_BYTES // 1024} KiB refused")
    method, target, headers, length = parse_head(bytes(buffer[:end]))
    del buffer[: end + 4]
    deadline = time.monotonic() + body_timeout
    while len(buffer) < length:
        _receive(conn, buffer, deadline, f"the body ({len(buffer)} of {length} bytes)")
    if len(buffer) > length:
        raise HttpRefusedError("bytes after the body: pipelined requests are refused (one request per connection)")
    return Request(method, target, headers, bytes(buffer))


def _receive(conn: socket.socket, buffer: bytearray, deadline: float, what: str) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise HttpRefusedError(f"timed out waiting for {what}: nothing forwarded")
    conn.settimeout(left)
    try:
        chunk = conn.recv(65536)
    except TimeoutError:
        raise HttpRefusedError(f"timed out waiting for {what}: nothing forwarded") from None
    if not chunk:
        raise HttpRefusedError(f"connection closed before the end of {what}: nothing forwarded")
    buffer += chunk
