"""Every install builds from a hashed lock (issue 11, 5): the two images and the test environment install with
--require-hashes from requirements/*.lock, every pinned package carries its hashes, and each lock holds what
its inputs ask for. `scripts/lock` refreshes them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCKS = sorted((ROOT / "requirements").glob("*.lock"))
_PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^ ;\\]+)")


def pins(lock: Path) -> dict[str, list[str]]:
    """name -> the hashes listed for it."""
    found: dict[str, list[str]] = {}
    current = None
    for line in lock.read_text().splitlines():
        if match := _PIN.match(line):
            current = match.group(1).lower().replace("_", "-")
            found[current] = []
        found.setdefault(current or "", [])
        found[current or ""].extend(re.findall(r"--hash=sha256:([0-9a-f]{64})", line))
    found.pop("", None)
    return found


def test_three_locks_exist() -> None:
    assert [p.name for p in LOCKS] == ["autoscaler.lock", "dev.lock", "stack.lock"]


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_every_pinned_package_has_its_hashes(lock: Path) -> None:
    found = pins(lock)
    assert found, lock
    assert not [name for name, hashes in found.items() if not hashes]


@pytest.mark.parametrize(("path", "lock"), [
    ("Dockerfile", "requirements/autoscaler.lock"),
    ("stack/Dockerfile", "/tmp/stack.lock"),
    ("scripts/test", "requirements/dev.lock"),
])
def test_installs_require_hashes(path: str, lock: str) -> None:
    text = (ROOT / path).read_text()
    installs = [line for line in text.splitlines() if re.search(r"pip(3)? install", line) and "-r " in line]
    assert installs and all("--require-hashes" in line for line in installs), installs
    assert lock in text
    # Nothing else is resolved from the index: the package itself goes in with --no-deps.
    others = [line for line in text.splitlines() if re.search(r"pip(3)? install", line) and "-r " not in line
              and "--upgrade pip" not in line and "pip-tools" not in line]
    assert all("--no-deps" in line for line in others), others


def test_the_locks_agree_on_every_shared_package() -> None:
    versions: dict[str, set[str]] = {}
    for lock in LOCKS:
        for line in lock.read_text().splitlines():
            if match := _PIN.match(line):
                versions.setdefault(match.group(1).lower(), set()).add(match.group(2))
    assert not {name: v for name, v in versions.items() if len(v) > 1}


def test_the_tools_ci_runs_are_pinned() -> None:
    dev = pins(ROOT / "requirements" / "dev.lock")
    for tool in ("ruff", "mypy", "pytest", "hypothesis", "import-linter"):
        assert tool in dev, tool
