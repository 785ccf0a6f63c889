"""The Compose backend's data: a service's replicas as the Engine API lists them, and pure helpers.

No Docker calls here: `Replica` is built from a container-list entry, `choose_victims` orders replicas for a
scale-down, `describe_replicas` words a status.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoscaler.backends.base import OWNER_LABEL
from autoscaler.policy.model import PoolPolicy

__all__ = [
    "CLONE_LABEL",
    "CONTAINER_NUMBER_LABEL",
    "CREATED_GRACE",
    "KEEP_FAILED",
    "ONEOFF_LABEL",
    "PRESENT_STATES",
    "PROJECT_LABEL",
    "SERVICE_LABEL",
    "VERSION_LABEL",
    "Replica",
    "ReplicaProblems",
    "ServiceRef",
    "choose_victims",
    "container_ids_from_mounts",
    "describe_replicas",
    "normalize_project",
    "nothing_to_clone",
    "room_to_create",
]

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
CONTAINER_NUMBER_LABEL = "com.docker.compose.container-number"
ONEOFF_LABEL = "com.docker.compose.oneoff"
VERSION_LABEL = "com.docker.compose.version"
# A warm standby (autoscaler.clone_spec.ROLE_LABEL): counted against max + warm, not max, until activated.
ROLE_LABEL = "autoscaler.role"
# Marks the containers this backend created, so only its own crashed starts are ever cleaned up: a
# `docker compose create` / `up --no-start` container of the same service is the operator's to start.
CLONE_LABEL = "autoscaler.clone"
# A `created` container younger than this may be `docker compose up` between create and start; older
# ones are leftovers of a start that crashed and are removed.
CREATED_GRACE = 60.0
# Failed replicas kept for `docker logs`/`inspect`; older ones are removed so a crash loop cannot pile up
# exited containers tick after tick.
KEEP_FAILED = 5
# Containers that exist as replicas (stopped ones are the kept template or failures kept for their logs).
PRESENT_STATES = frozenset({"running", "restarting", "paused", "created"})
_EXIT_CODE = re.compile(r"^Exited \((-?\d+)\)")
_HEALTH = re.compile(r"\((health: starting|healthy|unhealthy)\)")
_CONTAINER_ID_IN_MOUNTS = re.compile(r"/containers/([0-9a-f]{64})/")


@dataclass(frozen=True, slots=True)
class Replica:
    """One container of a Compose service, from the container list (no inspect needed)."""

    id: str
    name: str
    state: str
    status: str
    created: float
    labels: dict[str, str]

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> Replica:
        names = summary.get("Names") or ["/" + str(summary["Id"])[:12]]
        return cls(
            id=str(summary["Id"]),
            name=str(names[0]).lstrip("/"),
            state=str(summary.get("State", "")),
            status=str(summary.get("Status", "")),
            created=float(summary.get("Created", 0)),
            labels=dict(summary.get("Labels") or {}),
        )

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def number(self) -> int:
        try:
            return int(self.labels.get(CONTAINER_NUMBER_LABEL, "0"))
        except ValueError:
            return 0

    @property
    def owner(self) -> str | None:
        return self.labels.get(OWNER_LABEL)

    @property
    def health(self) -> str | None:
        found = _HEALTH.search(self.status)
        return found.group(1).removeprefix("health: ") if found else None

    @property
    def exit_code(self) -> int | None:
        found = _EXIT_CODE.match(self.status)
        return int(found.group(1)) if found else None

    def newest_first_key(self) -> tuple[int, float]:
        return (self.number, self.created)


@dataclass(frozen=True, slots=True)
class ReplicaProblems:
    """Replicas of a pool that are present but not working, as seen by the last `status()`."""

    exited: int = 0
    oom_killed: int = 0
    dead: int = 0
    restarting: int = 0

    @property
    def total(self) -> int:
        return self.exited + self.oom_killed + self.dead + self.restarting

    def describe(self) -> str:
        parts = [
            f"{count} {label}"
            for count, label in (
                (self.exited, "exited with an error"),
                (self.oom_killed, "OOM-killed"),
                (self.dead, "dead"),
                (self.restarting, "restarting"),
            )
            if count
        ]
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class ServiceRef:
    project: str
    service: str

    def __str__(self) -> str:
        return f"compose service {self.service} in project {self.project}"


def normalize_project(name: str) -> str:
    """Compose's own project-name normalisation (lower case, only [a-z0-9_-]), so `MyApp` finds `myapp`."""
    return re.sub(r"[^-_a-z0-9]", "", name.lower()).lstrip("-_")


def choose_victims(replicas: Sequence[Replica], *, count: int, busy: set[str] | None) -> list[Replica]:
    """The `count` replicas to stop: idle before busy, then newest (highest container number) first."""
    busy_hosts = busy or set()

    def key(replica: Replica) -> tuple[bool, int, float]:
        number, created = replica.newest_first_key()
        return (replica.short_id in busy_hosts, -number, -created)

    return sorted(replicas, key=key)[: max(count, 0)]


def nothing_to_clone(target: ServiceRef, pool: PoolPolicy) -> str:
    return (
        f"{target} has no container (running or stopped) for pool {pool.name} to clone: run "
        f"`docker compose -p {target.project} up -d {target.service}` once (the autoscaler keeps one "
        "stopped replica when it scales to zero, so this only happens if that one was removed)"
    )


def container_ids_from_mounts() -> list[str]:
    # With a custom hostname the id still shows in the paths Docker bind-mounts (/etc/hostname...).
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    return list(dict.fromkeys(_CONTAINER_ID_IN_MOUNTS.findall(text)))


def describe_replicas(
    *, running: int, unhealthy_yet: int, starting: int, draining: int, problems: ReplicaProblems
) -> str:
    parts = [f"{running} running" + (f" ({unhealthy_yet} not healthy yet)" if unhealthy_yet else "")]
    if starting:
        parts.append(f"{starting} starting")
    if draining:
        parts.append(f"{draining} draining")
    if problems.total:
        parts.append(problems.describe())
    return ", ".join(parts)


def room_to_create(
    pool: PoolPolicy, replicas: Sequence[Replica], *, draining: set[str], live: set[str], desired: int, standbys: int,
    now: float, created_grace: float,
) -> tuple[int, int, str]:
    """(replicas, standbys) a scale-up to `desired` (`live`: the running replicas that are capacity) may create,
    and why none when neither (else "").

    Replicas that are restarting, paused or just created count as capacity on their way (a crash loop with
    `restart: unless-stopped` is "restarting", never running), and every container that exists and is not
    stopped counts against `max`, whatever its state, victims still draining included: the autoscaler never has
    more than `max` of a pool (`max + surge` while victims drain), nor more than `max + warm` with its standbys
    (labelled, not active). The decision caps first; this is the backend refusing even if asked.
    """
    stopping = [r for r in replicas if r.id in draining and r.state in PRESENT_STATES]
    everything = [r for r in replicas if r.id not in draining and r.state in PRESENT_STATES]
    present = [r for r in everything if r.id in live or r.labels.get(ROLE_LABEL) is None]
    # How many the other containers may number: victims still run, and only they make room for `surge`.
    allowed = pool.max + min(pool.surge, len(stopping)) - len(stopping)
    # An old `created` container that is not ours is the operator's: counted against max, not as coming.
    coming = [
        r for r in present
        if r.state in ("restarting", "paused") or (r.state == "created" and now - r.created < created_grace)
    ]
    count = max(0, min(desired - len(live) - len(coming), allowed - len(present)))
    boot = max(0, min(standbys, allowed + pool.warm - len(everything) - count))
    if count + boot > 0:
        return count, boot, ""
    if coming and desired - len(live) - len(coming) <= 0:
        return 0, 0, (
            f"{len(coming)} replica(s) restarting or starting ({', '.join(r.name for r in coming[:3])}) already make "
            f"up the {desired - len(live)} wanted; not creating more"
        )
    drains = f" ({len(stopping)} draining)" if stopping else ""
    surge = f" + surge {pool.surge}" if pool.surge and stopping else ""
    warm = f" + warm {pool.warm}" if pool.warm else ""
    return 0, 0, f"{len(everything) + len(stopping)} containers exist{drains}, max is {pool.max}{surge}{warm}; " \
        "not creating more"
