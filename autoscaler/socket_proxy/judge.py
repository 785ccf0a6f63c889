"""From a parsed request to what the proxy does with it: forward a request it builds, answer, or refuse.

The lookups a judgement needs (the target container's labels, a service's possible clone sources, a Swarm
service's labels and current spec) are the proxy's own engine calls. A target that does not exist gets the
engine's own 404, so the autoscaler's "already gone" handling works behind the proxy as without it. A
target is addressed by the full id the lookup found: the forwarded request acts on the container or
service that was judged, even if a name moves meanwhile.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from autoscaler.clone_spec import OWNER_LABEL, PROJECT_LABEL, SERVICE_LABEL
from autoscaler.socket_proxy.calls import Call, Context, Target, match_call
from autoscaler.socket_proxy.clones import CloneRefusedError, is_replica, judge_connect, judge_create
from autoscaler.socket_proxy.engine import Engine, EngineAnswer
from autoscaler.socket_proxy.request import Request
from autoscaler.socket_proxy.services import ServiceRefusedError, judge_update, require_service
from autoscaler.socket_proxy.strict_json import loads_object

__all__ = ["Forward", "Judge", "RefusedError"]

_CONTAINER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_SWARM_TARGETS = frozenset({Target.STACK_SERVICE, Target.POOL_TASKS, Target.REPLICAS_UPDATE})


class RefusedError(ValueError):
    """Refused: answered 403 with `socket proxy: <message>`, logged, nothing forwarded."""


@dataclass(frozen=True, slots=True)
class Forward:
    name: str  # the call, for the log
    method: str
    target: str  # path and canonical query
    body: bytes | None


@dataclass(frozen=True, slots=True)
class Judge:
    engine: Engine
    context: Context

    def judge(self, request: Request) -> Forward | EngineAnswer:
        """What to send the engine for `request` (or the engine's answer to relay); RefusedError if refused."""
        call, version, params, query = _match(request, self.context)
        body = _body(call, request)
        if call.target in _SWARM_TARGETS:
            judged = self._judge_swarm(call, version, params, query, body)
        else:
            judged = self._judge_containers(call, params, query, body)
        if isinstance(judged, EngineAnswer):
            return judged
        name, forwarded = judged
        path = version + call.path(params)
        target = path + ("?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote) if query else "")
        data = None if forwarded is None else json.dumps(forwarded).encode("ascii")
        return Forward(name, request.method, target, data)

    def _judge_containers(self, call: Call, params: dict[str, str], query: dict[str, str],
                          body: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None] | EngineAnswer:
        """The Compose backend's calls; `params` gets the full id of the container judged."""
        if call.target in (Target.PROJECT_CONTAINER, Target.POOL_CONTAINER):
            found = self._container(params["container"], pool_only=call.target is Target.POOL_CONTAINER,
                                    call=call.name)
            if isinstance(found, EngineAnswer):
                return found
            params["container"] = str(found["Id"])
        forwarded: dict[str, Any] | None = None
        if call.target is Target.CLONE:
            assert body is not None
            try:
                forwarded = judge_create(body, name=query["name"], projects=self.context.projects,
                                         sources=self._sources)
            except CloneRefusedError as exc:
                raise RefusedError(f"create refused: {exc}") from None
        elif call.target is Target.CONNECT:
            assert body is not None
            found = self._container(str(body.get("Container", "")), pool_only=True, call=call.name)
            if isinstance(found, EngineAnswer):
                return found
            try:
                forwarded = judge_connect(body, network=params["network"], clone=found,
                                          projects=self.context.projects, sources=self._sources)
            except CloneRefusedError as exc:
                raise RefusedError(f"connect refused: {exc}") from None
        return call.name, forwarded

    def _judge_swarm(self, call: Call, version: str, params: dict[str, str], query: dict[str, str],
                     body: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None] | EngineAnswer:
        """The Swarm backend's calls; the service is addressed by the full id of the one judged."""
        pool = call.target is not Target.STACK_SERVICE
        if call.target is Target.POOL_TASKS:
            service = self._service(json.loads(query["filters"])["service"][0], version, pool=pool, call=call.name)
            if isinstance(service, EngineAnswer):
                return service
            query["filters"] = json.dumps({"service": [str(service["ID"])]})
            return call.name, None
        service = self._service(params["service"], version, pool=pool, call=call.name)
        if isinstance(service, EngineAnswer):
            return service
        params["service"] = str(service["ID"])
        if call.target is not Target.REPLICAS_UPDATE:
            return call.name, None
        assert body is not None
        try:
            update = judge_update(body, info=service, version=int(query["version"]), stacks=self.context.stacks)
        except ServiceRefusedError as exc:
            raise RefusedError(f"service update refused: {exc}") from None
        if update.stale:
            return f"{call.name} (an older version: the current spec, for the engine to refuse)", update.body
        return call.name, update.body

    def _container(self, reference: str, *, pool_only: bool, call: str) -> dict[str, Any] | EngineAnswer:
        if not _CONTAINER.fullmatch(reference):
            raise RefusedError(f"{call}: {reference[:80]!r} is not a container name or id")
        answer = self.engine.get(f"/containers/{reference}/json")
        if answer.status == 404:
            return answer
        if answer.status != 200:
            raise RefusedError(f"{call}: could not inspect {reference[:80]} (engine answered {answer.status})")
        info: dict[str, Any] = answer.json()
        labels = info.get("Config", {}).get("Labels") or {}
        if labels.get(PROJECT_LABEL) not in self.context.projects:
            raise RefusedError(f"{call}: {reference[:80]} is not a container of the proxy's Compose projects")
        if pool_only and not labels.get(OWNER_LABEL):
            raise RefusedError(f"{call}: {reference[:80]} is not a pool's container (no label {OWNER_LABEL})")
        return info

    def _service(self, reference: str, version: str, *, pool: bool, call: str) -> dict[str, Any] | EngineAnswer:
        """The service's inspect (at the request's API version: what the sender read) if it is the proxy's."""
        answer = self.engine.get(f"{version}/services/{reference}")
        if answer.status == 404:
            return answer
        if answer.status != 200:
            raise RefusedError(f"{call}: could not inspect service {reference[:80]} (engine answered {answer.status})")
        info: dict[str, Any] = answer.json()
        try:
            require_service(info, self.context.stacks, pool=pool)
        except ServiceRefusedError as exc:
            raise RefusedError(f"{call}: {exc}") from None
        return info

    def _sources(self, project: str, service: str, pool: str) -> Iterator[dict[str, Any]]:
        """Inspects of the service's containers of `pool`: running first, then newest first."""
        filters = json.dumps({"label": [f"{PROJECT_LABEL}={project}", f"{SERVICE_LABEL}={service}"]})
        status, summaries = self.engine.get_json("/containers/json", {"all": "1", "filters": filters})
        if status != 200 or not isinstance(summaries, list):
            raise RefusedError(f"could not list the containers of service {service} (engine answered {status})")
        replicas = [s for s in summaries if isinstance(s, dict) and is_replica(s, pool)]
        replicas.sort(key=lambda s: (s.get("State") == "running", s.get("Created", 0)), reverse=True)
        for summary in replicas:
            status, info = self.engine.get_json(f"/containers/{summary['Id']}/json")
            if status == 200 and isinstance(info, dict):
                yield info


def _body(call: Call, request: Request) -> dict[str, Any] | None:
    if call.json_body:
        if request.headers.get("content-type") != "application/json":
            raise RefusedError(f"{call.name}: the body must be Content-Type application/json")
        try:
            return loads_object(request.body)
        except ValueError as exc:
            raise RefusedError(f"{call.name}: {exc}") from None
    if request.body:
        raise RefusedError(f"{call.name} takes no body")
    return None


def _match(request: Request, context: Context) -> Any:
    try:
        return match_call(request.method, request.target, context)
    except ValueError as exc:
        raise RefusedError(str(exc)) from None

