"""What a doctor check reports: one `Finding` per thing looked at, and the exit code they add up to."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["CannotCheckError", "Finding", "Status", "exit_code"]


class Status(enum.Enum):
    PASS = "PASS"  # noqa: S105 - a verdict, not a password
    WARN = "WARN"
    FAIL = "FAIL"
    # The check could not run (broker or engine unreachable, no permission): the doctor cannot vouch.
    UNKNOWN = "UNKNOWN"


class CannotCheckError(Exception):
    """A source the doctor needs cannot be read at all; the message says which and why (already redacted)."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's verdict: `saw` is what was observed, `why` the seed's failure mode it guards against (one
    line), `fix` what to change. Every text is already redacted and bounded: safe to print as it is."""

    area: str  # broker, networking, environment, memory, routing, eager, prefetch, postgres
    check: str
    status: Status
    saw: str
    why: str = ""
    fix: str = ""
    subject: str = ""  # what it is about: a container, a pool, a queue, the broker

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data


def exit_code(findings: Iterable[Finding], *, strict: bool = False) -> int:
    """1 if any check FAILed (or WARNed under --strict); else 2 if any could not run; else 0."""
    statuses = {f.status for f in findings}
    if Status.FAIL in statuses or (strict and Status.WARN in statuses):
        return 1
    if Status.UNKNOWN in statuses:
        return 2
    return 0
