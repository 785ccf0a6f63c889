"""PostgreSQL (the seed's connection exhaustion): connections in use now, and the policy's worst case.

Now: `count(*) FROM pg_stat_activity` against `max_connections` (WARN above 80 %, the seed's alert; FAIL
when only the superuser-reserved slots are left). Worst case: `worst_case_connections` (the policy's `max`
x each pool's concurrency x connections per process, plus web) against what non-superusers may open
(`max_connections - superuser_reserved_connections`): FAIL above it, WARN above 80 % of `max_connections`.
A pool's concurrency is what its live workers report (`stats`), else its containers' `--concurrency`.

Read-only: one session with default_transaction_read_only, SHOW and SELECT only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from autoscaler.doctor.containers import ContainerFacts
from autoscaler.doctor.findings import CannotCheckError, Finding, Status
from autoscaler.doctor.redact import redact_url, safe_error
from autoscaler.doctor.workers import WorkerFacts
from autoscaler.policy.connections import PoolConnections, worst_case_connections
from autoscaler.policy.model import PoolPolicy

__all__ = ["ALERT_PERCENT", "PostgresFacts", "concurrency_of", "postgres_findings", "read_postgres"]

ALERT_PERCENT = 80.0
_WHY = 'past max_connections every new connection fails: "FATAL: too many connections"'
_CONCURRENCY = re.compile(r"^(?:--concurrency=|-c)?([0-9]{1,6})$")


@dataclass(frozen=True, slots=True)
class PostgresFacts:
    url: str  # redacted
    max_connections: int
    reserved: int
    in_use: int


def concurrency_of(containers: Sequence[ContainerFacts], workers: Sequence[WorkerFacts]) -> int | None:
    """The pool's processes or threads per replica: the largest its workers report, else the command line's."""
    reported = [w.concurrency for w in workers if w.concurrency]
    if reported:
        return max(reported)
    for c in containers:
        args = list(c.command)
        for i, arg in enumerate(args):
            if arg in ("--concurrency", "-c") and i + 1 < len(args) and args[i + 1].isdigit():
                return int(args[i + 1])
            match = _CONCURRENCY.match(arg) if arg.startswith(("--concurrency=", "-c")) else None
            if match:
                return int(match.group(1))
    return None


def postgres_findings(facts: PostgresFacts, policy_pools: Sequence[PoolPolicy],
                      pools: Mapping[str, Sequence[ContainerFacts]], pool_workers: Mapping[str, Sequence[WorkerFacts]],
                      *, web_connections: int, per_process: int) -> list[Finding]:
    findings = []
    limit = max(1, facts.max_connections)
    usable = max(0, facts.max_connections - facts.reserved)
    percent = 100.0 * facts.in_use / limit
    status = Status.FAIL if facts.in_use >= usable else Status.WARN if percent > ALERT_PERCENT else Status.PASS
    findings.append(Finding("postgres", "connections in use", status,
                            f"{facts.in_use} of max_connections {facts.max_connections} ({percent:.0f} %; "
                            f"{facts.reserved} reserved for superusers; warn above {ALERT_PERCENT:.0f} %)",
                            _WHY, "close idle connections (CONN_MAX_AGE), or raise max_connections", facts.url))
    shares, unknown = [], []
    for pool in policy_pools:
        concurrency = concurrency_of(pools.get(pool.name, ()), pool_workers.get(pool.name, ()))
        if concurrency is None:
            unknown.append(pool.name)
            continue
        shares.append(PoolConnections(pool.name, pool.max, concurrency, per_process))
    budget = worst_case_connections(shares, web=web_connections)
    status = (Status.FAIL if budget.total > usable else
              Status.WARN if 100.0 * budget.total / limit > ALERT_PERCENT or unknown else Status.PASS)
    notes = []
    if unknown:
        notes.append(f"concurrency unknown (not counted) for {', '.join(unknown)}")
    if not web_connections:
        notes.append("web not counted (--web-connections)")
    findings.append(Finding(
        "postgres", "worst case vs max_connections", status,
        f"policy max x concurrency x {per_process} per process: {budget.explain()} vs {usable} usable of "
        f"{facts.max_connections}{'; ' + '; '.join(notes) if notes else ''}",
        _WHY, "raise max_connections to the worst case x 1.2, lower the pools' max, or pool connections "
        "(pgbouncer)", facts.url))
    return findings


def read_postgres(url: str, *, timeout: float) -> PostgresFacts:
    shown = redact_url(url)
    try:
        import psycopg  # noqa: PLC0415 - only `--database-url` needs it
    except ImportError:
        raise CannotCheckError("--database-url needs psycopg (pip install 'psycopg[binary]')") from None
    try:
        with psycopg.connect(url, connect_timeout=max(1, int(timeout)), autocommit=True,
                             options="-c default_transaction_read_only=on") as conn:
            max_connections = conn.execute("SHOW max_connections").fetchone()
            reserved = conn.execute("SHOW superuser_reserved_connections").fetchone()
            in_use = conn.execute("SELECT count(*) FROM pg_stat_activity").fetchone()
    except Exception as exc:  # psycopg.Error, a malformed URL (ProgrammingError), DNS: all "cannot check"
        raise CannotCheckError(f"cannot read PostgreSQL at {shown}: {safe_error(exc)}") from None
    try:
        return PostgresFacts(shown, int(max_connections[0]) if max_connections else 0,
                             int(reserved[0]) if reserved else 0, int(in_use[0]) if in_use else 0)
    except (TypeError, ValueError) as exc:
        raise CannotCheckError(f"PostgreSQL at {shown} answered oddly: {safe_error(exc)}") from None
