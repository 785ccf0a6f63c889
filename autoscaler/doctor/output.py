"""How findings are shown: text for a person (grouped, why and fix once per group), or one JSON object."""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import groupby

from autoscaler.doctor.findings import Finding, Status, exit_code

__all__ = ["AREAS", "render_json", "render_text"]

AREAS = ("broker", "networking", "environment", "memory", "routing", "eager", "prefetch", "postgres")


def _order(finding: Finding) -> tuple[int, str]:
    area = AREAS.index(finding.area) if finding.area in AREAS else len(AREAS)
    return area, finding.check


def render_text(findings: Sequence[Finding], *, strict: bool = False) -> str:
    lines = []
    ordered = sorted(findings, key=_order)  # stable: the order of reading within one check
    for (_, check), group in groupby(ordered, key=_order):
        items = list(group)
        for status in (Status.FAIL, Status.UNKNOWN, Status.WARN, Status.PASS):
            same = [f for f in items if f.status is status]
            for f in same:
                about = f"{f.subject}: " if f.subject else ""
                lines.append(f"{status.value:<7} {f.area:<11} {check}: {about}{f.saw}")
            if same and same[0].why:
                lines.append(f"{'':<8}why: {same[0].why}")
            if same and same[0].fix and status is not Status.PASS:
                lines.append(f"{'':<8}fix: {same[0].fix}")
    counts = {s: sum(f.status is s for f in findings) for s in Status}
    code = exit_code(findings, strict=strict)
    lines.append(f"{counts[Status.FAIL]} FAIL, {counts[Status.WARN]} WARN, {counts[Status.UNKNOWN]} UNKNOWN, "
                 f"{counts[Status.PASS]} PASS: exit {code}")
    return "\n".join(lines)


def render_json(findings: Sequence[Finding], *, strict: bool = False) -> str:
    return json.dumps({"exit_code": exit_code(findings, strict=strict),
                       "findings": [f.to_json() for f in sorted(findings, key=_order)]}, ensure_ascii=True)
