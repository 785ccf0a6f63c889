"""Fixtures of the fault suite, and its report: one table, printed at the end of the run, one row per fault."""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
from rig import ROWS, Report, Rig

from tests.docker.conftest import ProjectFactory


@pytest.fixture(scope="session")
def fault_report() -> Report:
    return Report()


@pytest.fixture
def rig(compose_project: ProjectFactory, redis_url: str, tmp_path: Path) -> Iterator[Rig]:
    """The app up with one worker; the controller's state in the host's Redis, as a separate state Redis."""
    # A subnet of its own (the broker keeps its address across a restart); another run's may hold one.
    for attempt in range(5):
        third = random.randrange(0, 256)
        env = {"FAULTS_SUBNET": f"10.213.{third}.0/24", "FAULTS_BROKER_IP": f"10.213.{third}.250",
               "FAULTS_LEDGER_IP": f"10.213.{third}.251"}
        try:
            project = compose_project("faults.yaml", tag="fault", env=env)
            break
        except AssertionError:
            if attempt == 4:
                raise
    made = Rig(project=project, state_url=redis_url, policy=tmp_path / "policy.yaml")
    made.write_policy()
    try:
        yield made
    finally:
        made.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not ROWS:
        return
    header = ("fault", "published", "completed", "redelivered", "lost", "actions", "reversals", "recover s",
              "what the operator saw")
    rows = [
        (
            r.fault, str(r.tally.published), str(r.tally.completed), str(r.tally.redelivered), str(r.tally.lost),
            str(r.actions), str(r.reversals), "-" if r.recover_s is None else f"{r.recover_s:.1f}",
            r.operator_saw[:160],
        )
        for r in ROWS
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    terminalreporter.section("fault suite")
    for row in [header, *rows]:
        terminalreporter.write_line(" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    path = Path(os.environ.get("AUTOSCALER_FAULTS_REPORT") or Path(tempfile.gettempdir()) / "autoscaler-faults.json")
    path.write_text(json.dumps([asdict(r) for r in ROWS], indent=2) + "\n")
    terminalreporter.write_line(f"(also in {path})")
