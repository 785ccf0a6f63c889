"""Judging the Swarm backend's calls: which services it may read, and the one change it may make to them.

A service is the proxy's only if its `com.docker.stack.namespace` label names one of the proxy's stacks.
Its tasks are listed, and its spec updated, only if it also carries the pool opt-in label
`autoscaler.pool` (a service label, as the backend requires). An update passes only if its body is the
service's current spec, key for key and type for type, with nothing changed but
`Mode.Replicated.Replicas`: the spec the proxy has just read itself, at the version the update carries.

The version is what makes that comparison hold at the engine: Swarm applies an update only if its version
is the service's version at that moment, and a service's version only grows. So an update carrying the
version the proxy read is judged against exactly the spec it would replace (if the service changes
meanwhile, the engine refuses it as out of sequence); an update carrying an older version can never apply,
and is forwarded (as the current spec with the count it asks for, never the client's body) for the engine
to answer "update out of sequence", which the autoscaler's re-read-and-retry expects; a newer version than
the proxy read is nothing the autoscaler sends, and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autoscaler.clone_spec import OWNER_LABEL
from autoscaler.socket_proxy.clones import first_difference

__all__ = ["MAX_REPLICAS", "STACK_LABEL", "ServiceRefusedError", "UpdateDecision", "judge_update", "require_service"]

STACK_LABEL = "com.docker.stack.namespace"
# Far above any worker pool; a bound so that a compromised autoscaler cannot ask the swarm for millions.
MAX_REPLICAS = 10_000


class ServiceRefusedError(ValueError):
    """Not a service of the proxy's, or not an update the autoscaler would send; the message says what."""


@dataclass(frozen=True, slots=True)
class UpdateDecision:
    body: dict[str, Any]  # what to forward: the current spec with the asked-for replica count
    stale: bool  # the version is older than the service's: forwarded for the engine to refuse


def require_service(info: Any, stacks: frozenset[str], *, pool: bool) -> dict[str, Any]:
    """The service's Spec if `info` (a service inspect) is a service of `stacks` (and a pool's if `pool`)."""
    spec = info.get("Spec") if isinstance(info, dict) else None
    if not isinstance(spec, dict):
        raise ServiceRefusedError("the engine's service inspect has no Spec")
    name = str(spec.get("Name", info.get("ID", "?")))[:80]
    labels = spec.get("Labels") or {}
    stack = labels.get(STACK_LABEL)
    if stack not in stacks:
        raise ServiceRefusedError(f"service {name} is not in the proxy's Swarm stacks (label {STACK_LABEL})")
    if pool and not labels.get(OWNER_LABEL):
        raise ServiceRefusedError(f"service {name} is not a pool's (no service label {OWNER_LABEL})")
    return spec


def _asked_replicas(body: dict[str, Any]) -> int:
    mode = body.get("Mode")
    replicated = mode.get("Replicated") if isinstance(mode, dict) else None
    replicas = replicated.get("Replicas") if isinstance(replicated, dict) else None
    if type(replicas) is not int:
        raise ServiceRefusedError(f"Mode.Replicated.Replicas is {replicas!r:.40}, not a replica count")
    if not 0 <= replicas <= MAX_REPLICAS:
        raise ServiceRefusedError(f"Mode.Replicated.Replicas {replicas} is outside 0..{MAX_REPLICAS}")
    return replicas


def _without_top_level_nulls(spec: dict[str, Any]) -> dict[str, Any]:
    # docker-py drops them before sending; to Go's decoder a null and an absent key are the same.
    return {key: value for key, value in spec.items() if value is not None}


def judge_update(body: dict[str, Any], *, info: dict[str, Any], version: int, stacks: frozenset[str]) -> UpdateDecision:
    """What to forward for an update of the service `info` (its inspect) at `version`; or ServiceRefusedError."""
    spec = require_service(info, stacks, pool=True)
    name = str(spec.get("Name", "?"))[:80]
    mode = spec.get("Mode")
    if not isinstance(mode, dict) or "Replicated" not in mode:
        raise ServiceRefusedError(f"service {name} is not a replicated service")
    current = int((info.get("Version") or {}).get("Index", -1))
    if version > current:
        raise ServiceRefusedError(f"version {version} is newer than service {name}'s ({current})")
    replicas = _asked_replicas(body)
    expected = _without_top_level_nulls(
        {**spec, "Mode": {**mode, "Replicated": {**(mode["Replicated"] or {}), "Replicas": replicas}}})
    if version < current:
        return UpdateDecision(expected, stale=True)
    difference = first_difference(_without_top_level_nulls(body), expected, theirs="the service's",
                                  absent="not in the service's spec")
    if difference is not None:
        raise ServiceRefusedError(f"only Mode.Replicated.Replicas may change: {difference}")
    return UpdateDecision(expected, stale=False)
