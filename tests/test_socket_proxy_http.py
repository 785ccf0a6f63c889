"""The socket proxy's reading of a request: framing, JSON and the call table (autoscaler.socket_proxy).

The call table is checked against what docker-py really sends: each call the Compose backend makes is
made here by docker-py against a recording stand-in HTTP server, and every request it recorded must match
its rule with the same canonical query. tests/docker/test_socket_proxy.py sends the same to the real thing.
"""

from __future__ import annotations

import socket
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import docker
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.socket_proxy.calls import Context, match_call
from autoscaler.socket_proxy.request import (
    MAX_BODY_BYTES,
    HttpRefusedError,
    parse_head,
    read_request,
)
from autoscaler.socket_proxy.strict_json import JsonRefusedError, loads_object

CONTEXT = Context(projects=frozenset({"stack"}), max_stop_seconds=600)
HEAD = "POST /v1.41/containers/create?name=x HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json"


# -- framing -----------------------------------------------------------------------------------------------

def test_a_plain_request_head_is_read() -> None:
    method, target, headers, length = parse_head(f"{HEAD}\r\nContent-Length: 12".encode())
    assert (method, target, headers["content-type"], length) == (
        "POST", "/v1.41/containers/create?name=x", "application/json", 12)


@pytest.mark.parametrize(("extra", "reason"), [
    ("\r\nTransfer-Encoding: chunked", "Transfer-Encoding"),
    ("\r\nTransfer-Encoding: chunked\r\nContent-Length: 5", "Transfer-Encoding"),
    ("\r\nContent-Length: 5\r\nContent-Length: 5", "given twice"),
    ("\r\nContent-Length: 5\r\ncontent-length: 7", "given twice"),
    ("\r\nContent-Length: +5", "not a plain number"),
    ("\r\nContent-Length: 5, 5", "not a plain number"),
    (f"\r\nContent-Length: {MAX_BODY_BYTES + 1}", "above 256 KiB"),
    ("\r\nX-A: a\r\n b", "obs-fold"),
    ("\r\nX-A: a\nContent-Length: 5", "bare CR or LF"),
    ("\r\nX-A: a\rb", "bare CR or LF"),
    ("\r\nBad Name: a", "not a header field"),
    ("\r\nX-A: caf\u00e9", "non-ASCII"),
    ("\r\nExpect: 100-continue", "Expect"),
    ("\r\nUpgrade: h2c", "Upgrade"),
    ("".join(f"\r\nX-{i}: a" for i in range(101)), "more than 100 header lines"),
])
def test_framing_that_two_parsers_could_read_differently_is_refused(extra: str, reason: str) -> None:
    with pytest.raises(HttpRefusedError, match=reason):
        parse_head(f"{HEAD}{extra}".encode())


@pytest.mark.parametrize(("line", "reason"), [
    ("POST /_ping HTTP/1.0", "HTTP/1.1 only"),
    ("PRI * HTTP/2.0", "HTTP/1.1 only"),
    ("PUT /containers/x/archive HTTP/1.1", "method"),
    ("GET  /_ping HTTP/1.1", "request line"),
    ("GET http://docker/_ping HTTP/1.1", "absolute path"),
])
def test_request_lines_other_than_the_clients_are_refused(line: str, reason: str) -> None:
    with pytest.raises(HttpRefusedError, match=reason):
        parse_head(f"{line}\r\nHost: docker".encode())


def _read(raw: bytes, *, close: bool = True, body_timeout: float = 5.0) -> object:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(raw)
        if close:
            theirs.shutdown(socket.SHUT_WR)
        try:
            return read_request(ours, body_timeout=body_timeout)
        except HttpRefusedError as exc:
            return str(exc)


def test_a_whole_request_is_read_with_its_body() -> None:
    request = _read(f"{HEAD}\r\nContent-Length: 2\r\n\r\n{{}}".encode(), close=False)
    assert getattr(request, "body", None) == b"{}"


def test_pipelined_short_late_and_oversized_requests_are_refused() -> None:
    one = f"{HEAD}\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    assert "pipelined" in str(_read(one + b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n"))
    assert "closed before the end of the body" in str(_read(f"{HEAD}\r\nContent-Length: 9\r\n\r\n{{}}".encode()))
    assert "timed out waiting for the body" in str(
        _read(f"{HEAD}\r\nContent-Length: 9\r\n\r\n{{}}".encode(), close=False, body_timeout=0.2))
    assert "head above 16 KiB" in str(_read(f"{HEAD}\r\nX-Pad: {'p' * 110_000}\r\n\r\n".encode()))
    assert "closed before the end of the request head" in str(_read(b"GET /_ping HTTP/1.1\r\n"))


def test_a_connection_closed_before_its_first_byte_is_no_request() -> None:
    assert _read(b"") is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_head_is_read_or_refused_with_a_reason(head: bytes) -> None:
    try:
        parse_head(head)
    except HttpRefusedError as exc:
        refusal = str(exc)
        assert refusal


# -- JSON --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "reason"), [
    (b'{"Privileged": false, "privileged": true}', "duplicate key 'privileged'"),
    (b'{"HostConfig": {"Binds": null, "BINDS": ["/:/h"]}}', "duplicate key 'BINDS'"),
    (b'{"Bind\\u017f": ["/:/h"]}', "non-ASCII key"),
    ('{"Bind\u017f": ["/:/h"]}'.encode(), "non-ASCII key"),
    (b'{"OomScoreAdj": NaN}', "NaN is not JSON"),
    (b'{"A": Infinity}', "Infinity is not JSON"),
    (b'["Privileged"]', "a list, not an object"),
    (b'{"A": 1} {"B": 2}', "Extra data"),
    (b'{"A": "\xff"}', "not UTF-8"),
    (b'{"A": ' * 20 + b"1" + b"}" * 20, "deeper than 16"),
    (b"[" * 100_000, "invalid JSON body"),
])
def test_json_go_would_read_otherwise_is_refused(body: bytes, reason: str) -> None:
    with pytest.raises(JsonRefusedError, match=reason):
        loads_object(body)


def test_escapes_are_decoded_before_judging() -> None:
    assert loads_object(b'{"Privil\\u0065ged": true}') == {"Privileged": True}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_an_object_or_refused_with_a_reason(text: str) -> None:
    try:
        assert isinstance(loads_object(text.encode("utf-8", "surrogatepass")), dict)
    except JsonRefusedError as exc:
        refusal = str(exc)
        assert refusal


# -- the calls ---------------------------------------------------------------------------------------------

class _Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str, bytes]]

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.seen.append((self.command, self.path, self.rfile.read(length)))
        body = b"[]" if self.path.split("?")[0].endswith("/containers/json") else b'{"Id": "x", "ApiVersion": "1.41"}'
        if "/events" in self.path:
            body = b""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _answer  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def docker_py_requests() -> Iterator[list[tuple[str, str, bytes]]]:
    """What docker-py sends for each call the Compose backend makes (as in backends/compose*.py)."""
    seen: list[tuple[str, str, bytes]] = []
    handler = type("Recorder", (_Recorder,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api = docker.APIClient(base_url=f"tcp://127.0.0.1:{server.server_address[1]}", version="1.41")
    filters = {"label": ["com.docker.compose.project=stack", "com.docker.compose.service=worker-fast"]}
    api.ping()
    api.containers(all=True, filters=filters)
    api.inspect_container("stack-worker-fast-1")
    api.inspect_image("autoscaler-stack:dev")
    api.inspect_image("sha256:" + "b" * 64)
    list(api.events(since=1733300000, until="1733300060.123456", decode=True,
                    filters={"type": "container", "container": "a" * 64, "event": "oom"}))
    api.create_container_from_config({"Image": "x"}, name="stack-worker-fast-3")
    api.start("a" * 64)
    api.stop("a" * 64, timeout=30)
    api.remove_container("a" * 64, v=True)
    api.remove_container("a" * 64, v=True, force=True)
    api.connect_container_to_network("a" * 64, "stack_backend", aliases=["stack-worker-fast-3", "workers"])
    api.stats("a" * 64, stream=False, one_shot=True)  # autoscaler doctor's memory sample
    yield seen
    api.close()
    server.shutdown()
    server.server_close()


def test_every_call_the_backend_makes_matches_its_rule_as_docker_py_spells_it(
        docker_py_requests: list[tuple[str, str, bytes]]) -> None:
    names = []
    for method, target, _ in docker_py_requests:
        call, version, _, query = match_call(method, target, CONTEXT)
        names.append(call.name)
        raw_query = target.partition("?")[2]
        assert version in ("", "/v1.41"), target
        assert set(query) == {kv.split("=")[0] for kv in raw_query.split("&") if kv}, target
    assert names == ["ping", "list containers", "inspect container", "inspect image", "inspect image",
                     "read events", "create container", "start container", "stop container", "remove container",
                     "remove container", "connect container to network", "container stats"]


@pytest.mark.parametrize(("method", "target", "reason"), [
    ("GET", "/v1.41/info", "not an endpoint"),
    ("POST", "/v1.41/containers/x/exec", "not an endpoint"),
    ("GET", "/v1.41/containers/x/logs", "not an endpoint"),
    ("POST", "/v1.41/containers/x/kill", "not an endpoint"),
    ("POST", "/v1.41/containers/x/restart", "not an endpoint"),
    ("GET", "/v1.23/containers/json", "below 1.24"),
    ("GET", "/v1.023/containers/json", "below 1.24"),
    ("GET", "/v2.0/_ping", "below 1.24"),
    ("GET", "/v1.41/containers/a%2f..%2finfo/json", "path refused"),
    ("GET", "/v1.41/containers//json", "path refused"),
    ("GET", "/v1.41/containers/json?all=1", "'filters' is required"),
    ("GET", '/v1.41/containers/json?filters={"label":["com.docker.compose.project=other"]}', "one of the proxy"),
    ("GET", '/v1.41/containers/json?filters={"status":["running"]}', "not one the autoscaler uses"),
    ("GET", '/v1.41/containers/json?filters={"label":["com.docker.compose.project=stack"]}&filters={}', "twice"),
    ("GET", "/v1.41/events", "'until' is required"),
    ("GET", "/v1.41/events?until=1&since=-5", "not a time"),
    ("POST", "/v1.41/containers/x/stop?t=1&signal=KILL", "'signal' is not one"),
    ("POST", "/v1.41/containers/x/stop?t=601", "above the proxy's 600s"),
    ("DELETE", "/v1.41/containers/x?v=True", "'force' is required"),
    ("DELETE", "/v1.41/containers/x?v=1&link=False&force=False", "not one of True"),
    ("DELETE", "/v1.41/containers/x?v=True&link=True&force=False", "not one of False"),
    ("POST", "/v1.41/containers/create", "'name' is required"),
    ("POST", "/v1.41/containers/create?name=../x", "not a container name"),
    ("POST", "/v1.41/containers/create?name=x;y", "not a container name"),
    ("GET", "/v1.41/containers/x/stats", "'one-shot' is required"),
    ("GET", "/v1.41/containers/x/stats?stream=True&one-shot=True", "not one of False"),
    ("GET", "/v1.41/containers/x/stats?stream=False&one-shot=False", "not one of True"),
])
def test_other_calls_and_parameters_are_refused(method: str, target: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        match_call(method, target, CONTEXT)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(["GET", "POST", "DELETE"]),
       st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=80))
def test_any_target_is_a_call_or_refused_with_a_reason(method: str, tail: str) -> None:
    try:
        call, _, parts, query = match_call(method, "/" + tail, CONTEXT)
    except ValueError as exc:
        refusal = str(exc)
        assert refusal
        return
    # What is forwarded is rebuilt from the parts: it must match the same rule again.
    again = call.path(parts) + ("?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote) if query else "")
    assert match_call(method, again, CONTEXT)[1:] == ("", parts, query)
