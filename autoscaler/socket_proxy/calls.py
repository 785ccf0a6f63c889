"""The allow-list: every Engine API call the Compose and Swarm backends (and `autoscaler doctor`) make, with exactly
the query they send.

One `Call` per allowed call: its method, its path (after an optional `/v1.NN` version prefix), the query
parameters it may carry (each with a check that also gives the value's canonical spelling), and what the
proxy must look up before passing it (`Target`). Adding a call the autoscaler starts to make is one entry
in CALLS (and its tests: tests/test_socket_proxy_http.py, tests/test_socket_proxy_services.py).
"""

from __future__ import annotations

import enum
import json
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from autoscaler.clone_spec import PROJECT_LABEL
from autoscaler.socket_proxy.strict_json import JsonRefusedError, loads_object

__all__ = ["CALLS", "Call", "CallRefusedError", "Context", "Target", "match_call"]

# Below 1.24 a start still took a HostConfig in its body; "1.023" is 1.23 to Docker: plain digits only.
MIN_API_MINOR = 24
_VERSION = re.compile(r"/v1\.([1-9][0-9])(?=/)")
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
_IMAGE = r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,255}"
_FILTER_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/=-]{0,255}")

QueryCheck = Callable[[str, "Context"], str]


class CallRefusedError(ValueError):
    """Not a call the autoscaler makes (or not with these parameters); the message says what."""


class Target(enum.Enum):
    NONE = "none"  # nothing to look up
    PROJECT_CONTAINER = "a container of a configured Compose project"
    POOL_CONTAINER = "a pool's container (label autoscaler.pool) of a configured Compose project"
    CLONE = "a create: exactly a clone of a pool service's container"
    CONNECT = "a network connect: exactly a clone's second network"
    STACK_SERVICE = "a Swarm service of a configured stack"
    POOL_TASKS = "the tasks of a pool's Swarm service (label autoscaler.pool) of a configured stack"
    REPLICAS_UPDATE = "a service update: exactly the current spec with another replica count"


@dataclass(frozen=True, slots=True)
class Context:
    projects: frozenset[str]  # Compose projects (label com.docker.compose.project)
    max_stop_seconds: int
    stacks: frozenset[str] = frozenset()  # Swarm stacks (label com.docker.stack.namespace)


# What a {part} of a route may be: names and ids as the Docker client puts them in a path, unescaped.
_PARTS = {"container": _NAME, "network": _NAME, "image": _IMAGE, "service": _NAME}


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    method: str
    route: str  # "/containers/{container}/stop": the path after the version prefix
    query: Mapping[str, QueryCheck] = field(default_factory=dict)
    required: frozenset[str] = frozenset()
    target: Target = Target.NONE
    json_body: bool = False

    def match(self, path: str) -> dict[str, str] | None:
        pattern = re.sub(r"\{(\w+)\}", lambda m: f"(?P<{m.group(1)}>{_PARTS[m.group(1)]})", self.route)
        found = re.fullmatch(pattern, path)
        return None if found is None else found.groupdict()

    def path(self, parts: Mapping[str, str]) -> str:
        return self.route.format(**{k: urllib.parse.quote(v, safe="/:") for k, v in parts.items()})


def exactly(*allowed: str) -> QueryCheck:
    def check(value: str, _: Context) -> str:
        if value not in allowed:
            raise CallRefusedError(f"value {value[:40]!r} is not one of {', '.join(allowed)}")
        return value
    return check


def integer(value: str, _: Context) -> str:
    if not re.fullmatch(r"0|[1-9][0-9]{0,11}", value):
        raise CallRefusedError(f"{value[:40]!r} is not a whole number of seconds")
    return value


def timestamp(value: str, _: Context) -> str:
    if not re.fullmatch(r"(0|[1-9][0-9]{0,11})(\.[0-9]{1,9})?", value):
        raise CallRefusedError(f"{value[:40]!r} is not a time in seconds")
    return value


def stop_seconds(value: str, context: Context) -> str:
    integer(value, context)
    if int(value) > context.max_stop_seconds:
        raise CallRefusedError(f"a stop grace of {value}s is above the proxy's {context.max_stop_seconds}s")
    return value


def container_name(value: str, _: Context) -> str:
    if not re.fullmatch(_NAME, value):
        raise CallRefusedError(f"{value[:40]!r} is not a container name")
    return value


def _filters(value: str, allowed: frozenset[str]) -> dict[str, list[str]]:
    try:
        parsed = loads_object(value.encode())
    except JsonRefusedError as exc:
        raise CallRefusedError(f"filters: {exc}") from None
    for key, values in parsed.items():
        if key not in allowed:
            raise CallRefusedError(f"filter {key!r} is not one the autoscaler uses")
        if not isinstance(values, list) or not values or not all(
            isinstance(v, str) and _FILTER_VALUE.fullmatch(v) for v in values
        ):
            raise CallRefusedError(f"filter {key!r} is not a list of plain values")
    return parsed


def container_filters(value: str, context: Context) -> str:
    parsed = _filters(value, frozenset({"label"}))
    labels = parsed.get("label", [])
    if not any(label.partition("=")[::2] == (PROJECT_LABEL, p) for label in labels for p in context.projects):
        raise CallRefusedError(f"a container listing must filter on {PROJECT_LABEL}= one of the proxy's projects")
    return json.dumps(parsed)


def event_filters(value: str, _: Context) -> str:
    return json.dumps(_filters(value, frozenset({"type", "container", "event"})))


def task_filters(value: str, _: Context) -> str:
    """One service, by name or id: which one, and whether it is a pool's, the judge looks up."""
    parsed = _filters(value, frozenset({"service"}))
    services = parsed.get("service", [])
    if len(services) != 1 or not re.fullmatch(_NAME, services[0]):
        raise CallRefusedError("a task listing must filter on exactly one service")
    return json.dumps(parsed)


def object_version(value: str, _: Context) -> str:
    if not re.fullmatch(r"0|[1-9][0-9]{0,18}", value) or int(value) >= 2**64:
        raise CallRefusedError(f"{value[:40]!r} is not an object version")
    return value


CALLS: tuple[Call, ...] = (
    Call("ping", "GET", "/_ping"),
    Call("version", "GET", "/version"),
    # docker-py's containers(all=True, filters=...): limit=-1, all, size=0, trunc_cmd=0, filters.
    Call("list containers", "GET", "/containers/json",
         {"limit": exactly("-1"), "all": exactly("0", "1"), "size": exactly("0"), "trunc_cmd": exactly("0"),
          "filters": container_filters}, required=frozenset({"filters"})),
    Call("inspect container", "GET", "/containers/{container}/json",
         target=Target.PROJECT_CONTAINER),
    Call("inspect image", "GET", "/images/{image}/json"),
    # `autoscaler doctor`'s memory samples: docker-py's stats(stream=False, one_shot=True), one answer each
    # (never a stream, which would hold a proxy connection open).
    Call("container stats", "GET", "/containers/{container}/stats",
         {"stream": exactly("False"), "one-shot": exactly("True")}, required=frozenset({"stream", "one-shot"}),
         target=Target.PROJECT_CONTAINER),
    # Bounded (until given): an OOM kill's events, read to tell it from another SIGKILL.
    Call("read events", "GET", "/events",
         {"since": timestamp, "until": timestamp, "filters": event_filters}, required=frozenset({"until"})),
    Call("create container", "POST", "/containers/create", {"name": container_name},
         required=frozenset({"name"}), target=Target.CLONE, json_body=True),
    Call("start container", "POST", "/containers/{container}/start",
         target=Target.POOL_CONTAINER),
    Call("stop container", "POST", "/containers/{container}/stop", {"t": stop_seconds},
         target=Target.POOL_CONTAINER),
    # docker-py's remove_container(v=True[, force=True]) sends all three, spelled by requests as True/False.
    Call("remove container", "DELETE", "/containers/{container}",
         {"v": exactly("True"), "link": exactly("False"), "force": exactly("False", "True")},
         required=frozenset({"v", "link", "force"}), target=Target.POOL_CONTAINER),
    Call("connect container to network", "POST", "/networks/{network}/connect",
         target=Target.CONNECT, json_body=True),
    # The Swarm backend (backends/swarm.py): docker-py's inspect_service(name) and tasks(filters=...), and
    # its own POST of the inspected spec with only the replica count changed (docker-py's _post_json).
    Call("inspect service", "GET", "/services/{service}", target=Target.STACK_SERVICE),
    Call("list tasks", "GET", "/tasks", {"filters": task_filters}, required=frozenset({"filters"}),
         target=Target.POOL_TASKS),
    Call("update service", "POST", "/services/{service}/update", {"version": object_version},
         required=frozenset({"version"}), target=Target.REPLICAS_UPDATE, json_body=True),
)


def _split_version(path: str) -> tuple[str, str]:
    if not re.match(r"/v[0-9]", path):
        return "", path
    match = _VERSION.match(path)
    if match is None or int(match.group(1)) < MIN_API_MINOR:
        raise CallRefusedError("API versions below 1.24 (or not written as /v1.NN/) are refused")
    return match.group(0), path[match.end():]


def _parse_query(raw: str) -> dict[str, str]:
    if not raw:
        return {}
    try:
        pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True, strict_parsing=True, max_num_fields=10,
                                       separator="&", errors="strict")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CallRefusedError(f"query not understood: {exc}") from None
    query: dict[str, str] = {}
    for key, value in pairs:
        if key in query:
            raise CallRefusedError(f"query parameter {key!r} given twice")
        query[key] = value
    return query


def match_call(method: str, target: str, context: Context) -> tuple[Call, str, dict[str, str], dict[str, str]]:
    """The call a request target is, its version prefix, path parts and canonical query; or CallRefusedError."""
    raw_path, _, raw_query = target.partition("?")
    if any(odd in raw_path for odd in ("%", "..", "//", "\\", ";")):
        raise CallRefusedError("path refused (%, .., //, \\ or ;)")
    version, path = _split_version(raw_path)
    for call in CALLS:
        parts = call.match(path)
        if parts is None or call.method != method:
            continue
        query = _parse_query(raw_query)
        unknown = sorted(set(query) - set(call.query))
        if unknown:
            raise CallRefusedError(f"{call.name}: query parameter {unknown[0][:40]!r} is not one the autoscaler sends")
        missing = sorted(call.required - set(query))
        if missing:
            raise CallRefusedError(f"{call.name}: query parameter {missing[0]!r} is required")
        canonical: dict[str, str] = {}
        for key, value in query.items():
            try:
                canonical[key] = call.query[key](value, context)
            except CallRefusedError as exc:
                raise CallRefusedError(f"{call.name}: {key}: {exc}") from None
        return call, version, parts, canonical
    raise CallRefusedError(f"{method} {path[:120]} is not an endpoint the autoscaler uses")
