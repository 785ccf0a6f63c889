"""The Docker Engine connection the Compose and Swarm backends share: lazy, retried, and plain-spoken.

The client is created on first use, not at start-up, so the controller starts (and serves /healthz) even
when the socket is not mounted yet, and recovers by itself when the daemon comes back. Every call goes
through `DockerConnection.call`, which retries transient failures (daemon restarting, socket briefly
missing, API 5xx) with jittered exponential backoff for a bounded time, then turns whatever docker-py or
requests raised into a `BackendError` that says what was attempted, against which daemon, and why.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import docker
import requests
from docker.errors import APIError, DockerException
from loguru import logger
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

from autoscaler.backends.base import BackendError

__all__ = [
    "DEFAULT_API_TIMEOUT",
    "DEFAULT_DOCKER_URL",
    "DEFAULT_RETRY_BUDGET",
    "Diagnosis",
    "DockerConflictError",
    "DockerConnection",
    "DockerNotFoundError",
    "DockerUnreachableError",
    "ErrorKind",
    "classify",
    "docker_time",
    "untyped_api",
]

DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"
# Per HTTP call; docker-py stretches it by the grace period for `stop`, so it only bounds quick calls.
DEFAULT_API_TIMEOUT = 20
# Total time one call may spend retrying: short enough that a tick stays well under its interval.
DEFAULT_RETRY_BUDGET = 10.0
FIRST_RETRY_WAIT = 0.2
MAX_RETRY_WAIT = 2.0
# Scale-ups start several containers at once and every stop holds a connection for its whole grace period.
MAX_POOL_SIZE = 32

ErrorKind = Literal[
    "socket-missing", "permission", "refused", "timeout", "connection", "server", "conflict", "not-found",
    "client", "no-swarm", "other",
]

# Failures a daemon that is restarting (or a socket that is being re-created) produces; worth a retry.
_TRANSIENT: frozenset[ErrorKind] = frozenset({"socket-missing", "refused", "timeout", "connection", "server"})
_UNREACHABLE: frozenset[ErrorKind] = frozenset(
    {"socket-missing", "permission", "refused", "timeout", "connection"}
)
_HINTS: dict[ErrorKind, str] = {
    "socket-missing": "no such socket — is /var/run/docker.sock mounted into this container, "
    "or is DOCKER_HOST right?",
    "permission": "permission denied — is the socket mounted and is the user in its group?",
    "refused": "connection refused — is dockerd running (or restarting)?",
    "timeout": "timed out — the daemon is overloaded or hung",
    "connection": "connection lost — the daemon may be restarting",
}

# How the daemon words "this node cannot answer Swarm calls" (HTTP 503).
_NOT_A_MANAGER = ("not a swarm manager", "not part of a swarm")

T = TypeVar("T")


class DockerUnreachableError(BackendError):
    """The daemon could not be reached at all (socket missing, permission denied, refused, timed out)."""


class DockerNotFoundError(BackendError):
    """The daemon answered 404: the container, image, network or service does not exist (any more)."""


class DockerConflictError(BackendError):
    """The daemon answered 409: e.g. a container name already taken, or a stale Swarm object version."""


@dataclass(frozen=True, slots=True)
class Diagnosis:
    kind: ErrorKind
    reason: str
    status: int | None = None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    # requests/urllib3 bury the OS error in args or `.reason`, docker-py chains it with `from`.
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        stack.extend(item for item in linked if isinstance(item, BaseException))


def _diagnose_transport(exc: BaseException) -> Diagnosis | None:
    chain = list(_causes(exc))
    for kind, types in (
        ("permission", (PermissionError,)),
        ("socket-missing", (FileNotFoundError,)),
        ("refused", (ConnectionRefusedError,)),
        ("timeout", (requests.Timeout, socket.timeout, TimeoutError)),
        ("connection", (requests.ConnectionError, ConnectionError)),
    ):
        if any(isinstance(item, types) for item in chain):
            return Diagnosis(kind, str(exc))  # type: ignore[arg-type]
    return None


def _diagnose_api(exc: APIError) -> Diagnosis:
    status = exc.status_code
    reason = exc.explanation or str(exc)
    if status == 404:
        return Diagnosis("not-found", reason, status)
    if status == 409:
        return Diagnosis("conflict", reason, status)
    if status == 503 and any(marker in reason for marker in _NOT_A_MANAGER):
        return Diagnosis("no-swarm", reason, status)  # a 503 that no retry will cure
    if status is not None and status >= 500:
        return Diagnosis("server", reason, status)
    return Diagnosis("client", reason, status)


def classify(exc: BaseException) -> Diagnosis:
    """What kind of failure a docker-py/requests exception is; exposed for tests and callers' logs."""
    if isinstance(exc, APIError) and exc.response is not None:
        return _diagnose_api(exc)
    transport = _diagnose_transport(exc)
    if transport is not None:
        return transport
    return Diagnosis("other", str(exc))


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, DockerException | requests.RequestException | OSError) and (
        classify(exc).kind in _TRANSIENT
    )


def _is_connection_failure(exc: BaseException) -> bool:
    # A timed-out request may still have been carried out, so only failures to connect at all count here.
    return isinstance(exc, DockerException | requests.RequestException | OSError) and (
        classify(exc).kind in _TRANSIENT - {"server", "timeout"}
    )


class DockerConnection:
    """A lazily created `docker.DockerClient` plus the retry-and-translate wrapper every backend call uses.

    `base_url` overrides DOCKER_HOST (unset: DOCKER_HOST, then the default socket). Thread-safe: the
    backends call it from their start/stop worker threads. `fence(what)` runs immediately before every
    attempt of every call and may raise (the leader lease check: `autoscaler.leader.Fence`).
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        timeout: int = DEFAULT_API_TIMEOUT,
        retry_budget: float = DEFAULT_RETRY_BUDGET,
        max_pool_size: int = MAX_POOL_SIZE,
        fence: Callable[[str], None] | None = None,
    ) -> None:
        self._base_url = base_url
        self._fence = fence
        self._timeout = timeout
        self._retry_budget = retry_budget
        self._max_pool_size = max_pool_size
        self._client: docker.DockerClient | None = None
        self._reachable = False
        self._gave_up: tuple[float, str] | None = None  # when retries last ran out reaching the daemon, and why
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """The daemon address in use, for messages."""
        return self._base_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL

    def call(
        self, what: str, fn: Callable[[docker.DockerClient], T], *, retry: bool = True, fenced: bool = True
    ) -> T:
        """Run `fn(client)`; retry transient failures within the budget; raise BackendError saying `what`.

        `fenced=False` skips the lease check: only for finishing a drain already marked in the pool's state
        (stopping and removing those same victims is what the next leader does too, so it is idempotent).

        `retry=False` still retries failures to *reach* the daemon, never an answer it gave: for calls that
        are not idempotent (create) or whose 5xx is usually permanent (start).
        """
        gave_up = self._gave_up
        if gave_up is not None and time.monotonic() - gave_up[0] < self._retry_budget:
            # One call just spent the whole budget finding the daemon gone: the other pools of this tick
            # fail at once with that answer instead of each waiting out the budget again.
            raise DockerUnreachableError(f"{gave_up[1]} (not retried: the daemon was unreachable moments ago)")
        predicate = _is_transient if retry else _is_connection_failure
        retrying = Retrying(
            stop=stop_after_delay(self._retry_budget),
            wait=wait_random_exponential(multiplier=FIRST_RETRY_WAIT, max=MAX_RETRY_WAIT),
            retry=retry_if_exception(predicate),
            before_sleep=lambda state: self._log_retry(what, state),
            reraise=True,
        )
        started = time.monotonic()
        try:
            result = retrying(lambda: self._attempt(what, fn, fenced=fenced))
        except BackendError:
            raise
        except (DockerException, requests.RequestException, OSError) as exc:
            error = self._translate(what, exc, elapsed=time.monotonic() - started)
            if isinstance(error, DockerUnreachableError):
                self._gave_up = (time.monotonic(), str(error))
            raise error from exc
        self._gave_up = None
        return result

    def check_fence(self, what: str) -> None:
        """The same lease check as before each call, for actions that are not Docker calls (Celery control)."""
        if self._fence is not None:
            self._fence(what)

    def ping(self) -> None:
        """Raise BackendError unless the daemon answers."""
        self.call("ping the Docker daemon", lambda client: client.ping())

    def reset(self) -> None:
        """Drop the client so the next call builds a new one (e.g. after DOCKER_HOST changed)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def close(self) -> None:
        self.reset()

    def _attempt(self, what: str, fn: Callable[[docker.DockerClient], T], *, fenced: bool = True) -> T:
        if fenced and self._fence is not None:
            self._fence(what)
        if not self._reachable:
            self._preflight()
        try:
            result = fn(self._get())
        except (DockerException, requests.RequestException, OSError) as exc:
            if classify(exc).kind in _UNREACHABLE:
                self._reachable = False
            raise
        self._reachable = True
        return result

    def _preflight(self) -> None:
        # docker-py leaks its socket whenever connect() fails (a ResourceWarning per attempt), so while the
        # daemon is not known to be up, a connect of our own, closed properly, finds a dead socket first.
        path = _unix_socket_path(self.url)
        if path is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(self._timeout)
            probe.connect(path)

    def _get(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                # from_env asks the daemon for its API version, so this is where a missing daemon shows up.
                environment = dict(os.environ)
                if self._base_url:
                    environment["DOCKER_HOST"] = self._base_url
                self._client = docker.DockerClient.from_env(
                    timeout=self._timeout, max_pool_size=self._max_pool_size, environment=environment
                )
            return self._client

    def _translate(self, what: str, exc: BaseException, *, elapsed: float) -> BackendError:
        diagnosis = classify(exc)
        if diagnosis.kind in _UNREACHABLE:
            return DockerUnreachableError(
                f"cannot reach the Docker daemon at {self.url} to {what}: {_HINTS[diagnosis.kind]} "
                f"(gave up after {elapsed:.1f}s: {_short(diagnosis.reason)})"
            )
        status = f"HTTP {diagnosis.status}: " if diagnosis.status else ""
        message = f"could not {what}: the Docker daemon at {self.url} answered {status}{diagnosis.reason}"
        if diagnosis.kind == "not-found":
            return DockerNotFoundError(message)
        if diagnosis.kind == "conflict":
            return DockerConflictError(message)
        if diagnosis.kind == "no-swarm":
            return BackendError(
                f"could not {what}: the Docker daemon at {self.url} is not a Swarm manager — run the "
                "controller against a manager node (or `docker swarm init`)"
            )
        if diagnosis.kind == "other":
            return BackendError(f"could not {what} (Docker daemon at {self.url}): {diagnosis.reason}")
        return BackendError(message)

    def _log_retry(self, what: str, state: RetryCallState) -> None:
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        # One warning per call is enough to see a flapping daemon; the rest would only repeat it.
        log = logger.warning if state.attempt_number == 1 else logger.debug
        log(
            "Docker call failed ({}: {}); retrying in {:.1f}s (attempt {})",
            what, _short(classify(exc).reason, 160) if exc else "?", wait, state.attempt_number,
        )


def docker_time(value: Any, *, default: float) -> float:
    """Seconds since the epoch of a Docker RFC 3339 time with nanoseconds ("2026-12-01T13:40:00.123456789Z")."""
    if not isinstance(value, str) or not value:
        return default
    text = value.rstrip("Z")
    whole, _, fraction = text.partition(".")
    try:
        moment = dt.datetime.fromisoformat(f"{whole}.{(fraction or '0')[:6]:0<6}+00:00")
    except ValueError:
        return default
    return moment.timestamp()


def untyped_api(client: docker.DockerClient) -> Any:
    """`client.api` as Any: types-docker leaves a few low-level calls untyped (or mistypes them)."""
    return client.api


def _unix_socket_path(url: str) -> str | None:
    for scheme in ("unix://", "http+unix://"):
        if url.startswith(scheme):
            return url.removeprefix(scheme)
    return None


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
