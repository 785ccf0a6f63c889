"""Networking checks: where each worker (and web) container's broker and database addresses point.

The seed's first case: a worker configured with `redis://localhost:6379` works on a laptop and crashes
in a container, where localhost is the container itself. Users name these settings variously, so the
common variable names are read (ADDRESS_VARIABLES, plus any name ending in _BROKER_URL, _REDIS_URL or
_DATABASE_URL); the findings say which were found. An address is judged by its host:

* localhost, *.localhost, 127.0.0.0/8, ::1, 0.0.0.0 -> FAIL (unless the container shares the host's network);
* a dotless name no container on the container's networks answers to -> FAIL when every network is the
  project's own (the doctor sees every container on it), WARN when one is external (it may be served there);
* a dotted name or an IP address -> PASS (resolved by outside DNS: not judged).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from autoscaler.doctor.containers import ContainerFacts
from autoscaler.doctor.findings import Finding, Status
from autoscaler.doctor.redact import printable, safe_error, shown_value

__all__ = ["ADDRESS_VARIABLES", "Address", "address_findings", "addresses", "host_of", "resolvable_names"]

ADDRESS_VARIABLES = (
    "CELERY_BROKER_URL", "BROKER_URL", "CELERY_RESULT_BACKEND", "RESULT_BACKEND_URL", "REDIS_URL", "REDIS_HOST",
    "DATABASE_URL", "DB_HOST", "POSTGRES_HOST", "PGHOST", "DATABASE_HOST", "AMQP_URL", "RABBITMQ_URL",
)
_ADDRESS_SUFFIXES = ("_BROKER_URL", "_REDIS_URL", "_DATABASE_URL")
_WHY = 'inside a container localhost is the container itself: workers crash with "Connection refused"'
_FIX = "use the Compose service name (redis://redis:6379/0, postgres://...@db:5432/...), not localhost"


@dataclass(frozen=True, slots=True)
class Address:
    variable: str
    shown: str  # redacted value
    host: str | None  # None: no host (a unix socket) or unparsable (then `problem` says so)
    problem: str = ""


def host_of(value: str) -> tuple[str | None, str]:
    """The host an address names, and a problem if it cannot be read; never raises."""
    text = value.strip()
    if not text:
        return None, "empty"
    if "://" not in text:  # DB_HOST=db, REDIS_HOST=redis:6379, PGHOST=/var/run/postgresql
        if text.startswith("/"):
            return None, ""
        text = "//" + text
    try:
        parts = urlsplit(text)
        if parts.scheme in ("unix", "redis+socket", "socket"):
            return None, ""
        netloc = parts.netloc.rpartition("@")[2]
        if "," in netloc:  # several hosts (sentinels, libpq multi-host): judge the first
            netloc = netloc.partition(",")[0]
            parts = urlsplit("//" + netloc)
        host = parts.hostname
    except ValueError as exc:
        return None, f"not a URL ({safe_error(exc, 80)})"
    if not host:
        return None, "no host in it"
    return host, ""


def addresses(env: Mapping[str, str]) -> list[Address]:
    found = []
    for name in sorted(env):
        if name in ADDRESS_VARIABLES or name.endswith(_ADDRESS_SUFFIXES):
            host, problem = host_of(env[name])
            found.append(Address(name, shown_value(name, env[name]), host, problem))
    return found


def _is_loopback(host: str) -> bool:
    lowered = host.lower().rstrip(".")
    if lowered == "localhost" or lowered.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(lowered)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolvable_names(containers: Iterable[ContainerFacts]) -> dict[str, frozenset[str]]:
    """Network name -> every name Docker's DNS answers on it (container names, aliases, DNS names)."""
    names: dict[str, set[str]] = {}
    for container in containers:
        if not container.running:
            continue
        for network in container.networks:
            names.setdefault(network, set()).update(container.answers_to())
    return {network: frozenset(found) for network, found in names.items()}


def _judge(container: ContainerFacts, address: Address, dns: Mapping[str, frozenset[str]]) -> Finding:
    subject = container.name
    shown = f"{address.variable}={address.shown}"
    if address.host is None:
        if address.problem:
            return Finding("networking", "address", Status.WARN, f"{shown}: cannot read a host ({address.problem})",
                           _WHY, "give a URL such as redis://redis:6379/0", subject)
        return Finding("networking", "address", Status.PASS, f"{shown}: a local socket", _WHY, _FIX, subject)
    host = address.host
    host_network = container.network_mode == "host"
    if _is_loopback(host):
        if host_network:
            return Finding("networking", "address", Status.PASS,
                           f"{shown}: loopback, and the container uses the host's network", _WHY, _FIX, subject)
        return Finding("networking", "address", Status.FAIL, f"{shown} points at {printable(host, 80)}: the "
                       "container itself", _WHY, _FIX, subject)
    if "." in host or _is_ip(host) or host_network or host in container.extra_hosts:
        return Finding("networking", "address", Status.PASS, f"{shown}: resolved outside Docker's DNS, not judged",
                       _WHY, _FIX, subject)
    served_on = sorted(n for n in container.networks if host in dns.get(n, frozenset()))
    if served_on:
        return Finding("networking", "address", Status.PASS, f"{shown}: {host} answers on {', '.join(served_on)}",
                       _WHY, _FIX, subject)
    external = sorted(n for n in container.networks if not n.startswith(f"{container.project}_"))
    networks = ", ".join(sorted(container.networks)) or "none"
    status = Status.WARN if external else Status.FAIL
    unseen = f" (external network {', '.join(external)}: containers there are not seen)" if external else ""
    return Finding("networking", "address", status,
                   f"{shown}: no running container on its networks ({printable(networks, 120)}) answers to "
                   f"{printable(host, 80)}{unseen}",
                   "a name its networks cannot resolve fails like localhost: the worker cannot reach the broker",
                   "name a service on the same network, or attach the container to the broker's network", subject)


def address_findings(checked: Sequence[ContainerFacts], everyone: Sequence[ContainerFacts]) -> list[Finding]:
    """One finding per address variable of each `checked` container, plus which variables were found."""
    dns = resolvable_names(everyone)
    findings: list[Finding] = []
    seen: set[str] = set()
    for container in checked:
        if not container.running:
            continue
        found = addresses(container.env)
        seen.update(a.variable for a in found)
        findings.extend(_judge(container, a, dns) for a in found)
        if container.env_truncated:
            findings.append(Finding("networking", "environment size", Status.WARN,
                                    "more environment entries than the doctor reads; the rest was not checked",
                                    "", "", container.name))
    if not any(c.running for c in checked):
        return findings
    looked = ", ".join(ADDRESS_VARIABLES) + ", *" + ", *".join(_ADDRESS_SUFFIXES)
    status = Status.PASS if seen else Status.WARN
    findings.append(Finding("networking", "variables read", status,
                            f"found {', '.join(sorted(seen)) or 'none'} (looked for {looked})",
                            "the broker and database addresses are judged only where they are found",
                            "" if seen else "name the broker URL CELERY_BROKER_URL (or tell us your name for it)"))
    return findings
