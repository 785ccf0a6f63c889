"""From a parsed request to what the proxy does with it: forward a request it builds, answer, or refuse.

The lookups a judgement needs (the target container's labels, a service's possible clone sources) are the
proxy's own engine calls. A target that does not exist gets the engine's own 404, so the autoscaler's
"already gone" handling works behind the proxy as without it. A target is addressed by the full id the
lookup found: the forwarded request acts on the container that was judged, even if a name moves meanwhile.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from autoscaler.clone_spec import OWNER_LABEL, PROJECT_LABEL, SERVICE_LABEL
from autoscaler.socket_proxy.calls import Context, Target, match_call
from autoscaler.socket_proxy.clones import CloneRefusedError, is_replica, judge_connect, judge_create
from autoscaler.socket_proxy.engine import Engine, EngineAnswer
from autoscaler.socket_proxy.request import Request
from autoscaler.socket_proxy.strict_json import loads_object

__all__ = ["Forward", "Judge", "RefusedError"]

_CONTAINER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


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
        body: dict[str, Any] | None = None
        if call.json_body:
            if request.headers.get("content-type") != "application/json":
                raise RefusedError(f"{call.name}: the body must be Content-Type application/json")
            try:
                body = loads_object(request.body)
            except ValueError as exc:
                raise RefusedError(f"{call.name}: {exc}") from None
        elif request.body:
            raise RefusedError(f"{call.name} takes no body")
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
        path = version + call.path(params)
        target = path + ("?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote) if query else "")
        data = None if forwarded is None else json.dumps(forwarded).encode("ascii")
        return Forward(call.name, request.method, target, data)

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


def _match(request: Request, context: Context) -> Any:
    try:
        return match_call(request.method, request.target, context)
    except ValueError as exc:
        raise RefusedError(str(exc)) from None

