"""Judging a create or a network connect: accepted only if it is exactly what the autoscaler would send.

The proxy looks the source up itself. The create's labels name a Compose project (one of the proxy's own)
and service; the service's containers carrying the same `autoscaler.pool` label are the possible sources,
and the body must equal, key for key and type for type, the clone the Compose backend builds from one of
them (autoscaler.clone_spec: the same functions). The only freedom left to the sender is what the clone
code itself varies: the container number (and the name made of it), and the image by name or by id. A warm
standby is the one other body accepted: the same clone with the label `autoscaler.role=standby` and the queue
argument of its command replaced by its private queue (clone_spec.standby_config), and nothing else; a
standby's own config is never a source.
On top of that equality, a body that would give the container privileges, capabilities, devices or host
paths is refused even if its source has them: a worker pool must not need them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from autoscaler.clone_spec import (
    CLONE_LABEL,
    CONTAINER_NUMBER_LABEL,
    ONEOFF_LABEL,
    OWNER_LABEL,
    PROJECT_LABEL,
    ROLE_LABEL,
    SERVICE_LABEL,
    STANDBY_ROLE,
    StandbyRefusedError,
    clone_config,
    connect_body,
    create_body,
    endpoints,
    name_separator,
    standby_config,
)

__all__ = ["CloneRefusedError", "first_difference", "judge_connect", "judge_create", "never_allowed"]

# (summaries of the service's containers) -> their inspects, newest first; a vanished one is left out.
Sources = Callable[[str, str, str], Iterator[dict[str, Any]]]

_NUMBER = re.compile(r"[1-9][0-9]{0,5}")
# SecurityOpt entries that widen what the default profile allows.
_WIDENING_SECURITY_OPT = re.compile(r"(?i)^(seccomp|apparmor)[=:]unconfined$|^label[=:]disable$|^systempaths[=:]")


class CloneRefusedError(ValueError):
    """Not a clone the autoscaler would make; the message says which field differs and how."""


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values, types included (Python's 1 == 1.0 == True is not Go's)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def first_difference(sent: Any, expected: Any, where: str = "", *, theirs: str = "the source's",
                     absent: str = "not in a clone of the source") -> str | None:
    """Where `sent` first differs from `expected` ("HostConfig.Privileged: ..."), or None if it does not."""
    place = where or "the body"
    if type(sent) is not type(expected):
        return f"{place} is {_show(sent)}, {theirs} is {_show(expected)}"
    if isinstance(sent, dict):
        for key in sent:
            if key not in expected:
                return f"{where + '.' if where else ''}{key} is {absent}"
        for key in expected:
            if key not in sent:
                return f"{where + '.' if where else ''}{key} is missing"
            found = first_difference(sent[key], expected[key], f"{where + '.' if where else ''}{key}",
                                     theirs=theirs, absent=absent)
            if found:
                return found
        return None
    if isinstance(sent, list):
        if len(sent) != len(expected):
            return f"{place} has {len(sent)} items, {theirs} {len(expected)}"
        for index, (a, b) in enumerate(zip(sent, expected, strict=True)):
            found = first_difference(a, b, f"{place}[{index}]", theirs=theirs, absent=absent)
            if found:
                return found
        return None
    return None if sent == expected else f"{place} is {_show(sent)}, {theirs} is {_show(expected)}"


def never_allowed(body: dict[str, Any]) -> str | None:
    """What in a create body no pool may ask for, whatever its source has; None if nothing."""
    host = body.get("HostConfig") or {}
    if host.get("Privileged") is not False:
        return "HostConfig.Privileged"
    for key in ("CapAdd", "Devices", "DeviceRequests", "DeviceCgroupRules", "Binds", "Mounts", "VolumesFrom"):
        if host.get(key):
            return f"HostConfig.{key}"
    if host.get("VolumeDriver"):
        return "HostConfig.VolumeDriver"
    for option in host.get("SecurityOpt") or []:
        if not isinstance(option, str) or _WIDENING_SECURITY_OPT.search(option):
            return f"HostConfig.SecurityOpt {_show(option)}"
    return None


def _label(labels: dict[str, Any], key: str) -> str:
    value = labels.get(key)
    if not isinstance(value, str) or not value:
        raise CloneRefusedError(f"label {key} missing")
    return value


def judge_create(body: dict[str, Any], *, name: str, projects: frozenset[str], sources: Sources) -> dict[str, Any]:
    """The body to forward (equal to `body`) if it is a clone of a source container; else CloneRefusedError."""
    labels = body.get("Labels")
    if not isinstance(labels, dict):
        raise CloneRefusedError("no Labels")
    project, service = _label(labels, PROJECT_LABEL), _label(labels, SERVICE_LABEL)
    pool, number_text = _label(labels, OWNER_LABEL), _label(labels, CONTAINER_NUMBER_LABEL)
    if project not in projects:
        raise CloneRefusedError(f"project {project[:60]!r} is not one the proxy serves")
    if not _NUMBER.fullmatch(number_text):
        raise CloneRefusedError(f"container number {number_text[:20]!r}")
    number, image = int(number_text), body.get("Image")
    role = labels.get(ROLE_LABEL)
    if role is not None and role != STANDBY_ROLE:
        raise CloneRefusedError(f"label {ROLE_LABEL} is {str(role)[:20]!r}, not {STANDBY_ROLE!r}")
    differences: list[str] = []
    for source in sources(project, service, pool):
        source_name = str(source.get("Name", "")).lstrip("/")
        if ROLE_LABEL in (source["Config"].get("Labels") or {}):
            continue  # a standby (its label, its private queue) is never what a clone copies
        if image not in (source["Config"].get("Image"), source.get("Image")):
            differences.append(f"Image {_show(image)} is neither the image of {source_name} nor its id")
            continue
        expected_name = name_separator(source, project, service).join((project, service, number_text))
        if name != expected_name:
            differences.append(f"name {name!r} is not {expected_name!r}")
            continue
        primary, _ = endpoints(source, name=name)
        try:
            config = _expected_config(source, pool=pool, number=number, image=str(image), name=name, role=role)
        except StandbyRefusedError as exc:
            differences.append(f"no standby can be made of {source_name}: {exc}")
            continue
        expected = create_body(config, primary)
        difference = first_difference(body, expected)
        if difference is None:
            refused = never_allowed(expected)
            if refused is not None:
                raise CloneRefusedError(f"{refused} is never allowed (the source {source_name} has it)")
            return expected
        differences.append(f"{difference} (source {source_name})")
    if not differences:
        raise CloneRefusedError(f"service {service!r} of project {project!r} has no container of pool {pool!r}")
    raise CloneRefusedError(f"not a clone of service {service} in project {project}: {differences[0]}")


def _expected_config(
    source: dict[str, Any], *, pool: str, number: int, image: str, name: str, role: Any
) -> dict[str, Any]:
    """A plain clone of `source`, or its standby variant when the create asks for one."""
    if role is None:
        return clone_config(source, pool=pool, number=number, image=image)
    return standby_config(source, pool=pool, number=number, image=image, name=name)


def judge_connect(body: dict[str, Any], *, network: str, clone: dict[str, Any], projects: frozenset[str],
                  sources: Sources) -> dict[str, Any]:
    """The body to forward if it joins `clone` (its inspect) to a network its source is on; else CloneRefusedError."""
    labels = clone.get("Config", {}).get("Labels") or {}
    project, service = _label(labels, PROJECT_LABEL), _label(labels, SERVICE_LABEL)
    pool = _label(labels, OWNER_LABEL)
    if project not in projects:
        raise CloneRefusedError(f"the container is in project {project[:60]!r}, not one the proxy serves")
    if labels.get(CLONE_LABEL) != "true":
        raise CloneRefusedError("only a clone the autoscaler created is connected to a network")
    name = str(clone.get("Name", "")).lstrip("/")
    differences: list[str] = []
    for source in sources(project, service, pool):
        if source.get("Id") == clone.get("Id"):
            continue
        _, others = endpoints(source, name=name)
        for endpoint in others:
            if endpoint.network != network:
                continue
            expected = connect_body(str(clone.get("Id")), endpoint)
            difference = first_difference(body, expected)
            if difference is None:
                return expected
            differences.append(difference)
    if not differences:
        raise CloneRefusedError(f"network {network!r} is not a second network of any source of service {service}")
    raise CloneRefusedError(f"not the clone's endpoint on {network}: {differences[0]}")


def is_replica(summary: dict[str, Any], pool: str) -> bool:
    labels = summary.get("Labels") or {}
    return bool(labels.get(ONEOFF_LABEL, "False") != "True" and labels.get(OWNER_LABEL) == pool)
