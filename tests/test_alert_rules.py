"""The alert rules (deploy/prometheus/alerts.yaml) pass promtool's checks and their unit tests.

alerts.test.yaml holds, for every alert, series where it fires and series where it stays silent; promtool
(Debian's `prometheus` package, installed by scripts/test) evaluates them with Prometheus's own engine.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


def load(name: str) -> Any:
    return YAML(typ="safe").load((RULES / name).read_text())


def _promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed (apt-get install prometheus); scripts/test installs it")
    return binary


def _run(*args: str) -> str:
    done = subprocess.run([_promtool(), *args], cwd=RULES, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_rules_are_valid() -> None:
    assert "SUCCESS" in _run("check", "rules", "alerts.yaml")


def test_every_alert_fires_and_stays_silent_in_promtools_unit_tests() -> None:
    """promtool passes, and every alert has a test with an evaluation where it fires and one where it does not."""
    rules = load("alerts.yaml")
    alerts = {r["alert"] for group in rules["groups"] for r in group["rules"] if "alert" in r}
    cases = load("alerts.test.yaml")["tests"]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in cases:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    assert alerts == fires == silent, (alerts - fires, alerts - silent)
    assert "SUCCESS" in _run("test", "rules", "alerts.test.yaml")
