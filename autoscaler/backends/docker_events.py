"""A bounded read of the daemon's event log (`GET /events?since&until&filters`).

docker-py's `events()` streams with no timeout at all, and a daemon only ends the stream at `until`: one that
does not (a remote daemon whose clock runs behind, a proxy holding the connection, a hung daemon) held the
tick forever. Here the answer must come within `timeout`: each read waits at most that long, the whole read
(decoding included) ends by then, and at most `MAX_EVENT_BYTES` are read. Past any of these the count is
unknown: a BackendError, not retried (the same question would get the same non-answer).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, cast

import docker
import requests
import urllib3
from docker.errors import StreamParseError
from docker.utils import convert_filters
from docker.utils.json_stream import json_stream

from autoscaler.backends.base import BackendError
from autoscaler.backends.docker_client import untyped_api

__all__ = ["EVENTS_TIMEOUT", "MAX_EVENT_BYTES", "count_action", "count_events"]

# A daemon answers a since/until query of its last 256 events at once: seconds are plenty.
EVENTS_TIMEOUT = 5.0
# 256 events of well under 1 KiB each.
MAX_EVENT_BYTES = 1 << 20


class _UnfinishedError(Exception):
    """The stream did not end within the time or size allowed."""


def count_events(
    client: docker.DockerClient, *, since: int, until: str, filters: dict[str, Any], action: str,
    timeout: float = EVENTS_TIMEOUT,
) -> int:
    """How many events matching `filters` with Action `action` the daemon logged between `since` and `until`."""
    api = untyped_api(client)
    params = {"since": since, "until": until, "filters": convert_filters(filters)}
    deadline = time.monotonic() + timeout
    try:
        response = api._get(api._url("/events"), params=params, stream=True, timeout=timeout)
    except requests.Timeout as exc:
        raise BackendError(f"the daemon did not answer the events query within {timeout:g}s") from exc
    try:
        api._raise_for_status(response)
        return count_action(api._stream_helper(response, decode=False), action=action, deadline=deadline)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise BackendError(
            f"the daemon did not end the {action} events stream within {timeout:g}s ({type(exc).__name__}: "
            f"{exc}); the count is unknown"
        ) from exc
    finally:
        response.close()


def count_action(chunks: Iterable[bytes], *, action: str, deadline: float) -> int:
    """How many events of a daemon's event stream (JSON objects, one after another) have Action `action`.

    BackendError, saying where, when the stream runs past `deadline` (time.monotonic) or MAX_EVENT_BYTES, or
    is not a stream of JSON values."""
    read = [0]

    def bounded() -> Iterator[bytes]:
        for chunk in chunks:
            read[0] += len(chunk)
            if time.monotonic() > deadline or read[0] > MAX_EVENT_BYTES:
                raise _UnfinishedError
            yield chunk

    try:
        # json_stream decodes the bytes itself (its stub says str).
        events = json_stream(cast(Iterator[str], bounded()))
        return len([event for event in events if _action(event) == action])
    except _UnfinishedError as exc:
        raise BackendError(
            f"the daemon did not end the {action} events stream in time or within {MAX_EVENT_BYTES} bytes "
            f"({read[0]} read); the count is unknown"
        ) from exc
    except (StreamParseError, ValueError, RecursionError) as exc:
        raise BackendError(
            f"the {action} events stream is not JSON (within its first {read[0]} bytes: {exc}); the count is unknown"
        ) from exc


def _action(event: Any) -> Any:
    if not isinstance(event, dict):
        return None
    return event.get("Action", event.get("status"))
