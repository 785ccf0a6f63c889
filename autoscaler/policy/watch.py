"""Keeps the policy in force: reloads a changed file, and keeps the last good policy when an edit is bad."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from autoscaler.policy.load import PolicyError, Problem, load_policy
from autoscaler.policy.model import Policy

__all__ = ["FixedPolicy", "PolicyWatcher"]


class PolicyWatcher:
    """Compares the file's content hash at each poll rather than its mtime: editors that replace the file,
    mounts that swap a symlink, and two edits within one second are all seen."""

    def __init__(self, path: str | Path, *, check: Callable[[Policy], list[str]] | None = None) -> None:
        """`check` adds the controller's own conditions on a valid policy (e.g. its interval against the
        leader lock's expiry): each message it returns refuses the reload like a validation error."""
        self.path = Path(path)
        self._check = check
        self._digest = self._read_digest()
        self.policy: Policy = load_policy(self.path)  # a bad file at start-up is fatal: nothing good to keep
        self.last_errors: list[str] = []

    def poll(self, *, force: bool = False) -> tuple[Policy, str | None]:
        """The policy to use now, and "reloaded" / "invalid" / None (unchanged)."""
        digest = self._read_digest()
        if not force and digest == self._digest:
            return self.policy, None
        self._digest = digest
        try:
            policy = load_policy(self.path)
        except PolicyError as exc:
            return self._refuse(exc)
        if self._check is not None and (messages := self._check(policy)):
            return self._refuse(PolicyError([_located(self.path, message) for message in messages]))
        self.policy = policy
        self.last_errors = []
        logger.info("policy {} reloaded ({} pools)", self.path, len(policy.pools))
        return self.policy, "reloaded"

    def _refuse(self, exc: PolicyError) -> tuple[Policy, str]:
        self.last_errors = [str(p) for p in exc.problems]
        logger.bind(errors=self.last_errors).error(
            "policy {} is invalid; keeping the last good policy:\n{}", self.path, exc
        )
        return self.policy, "invalid"

    def _read_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None


def _located(path: Path, message: str) -> Problem:
    """A problem about a top-level field (`field: message`), at the line that sets it."""
    field, _, text = message.partition(": ")
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    pattern = re.compile(rf"^{re.escape(field)}\s*:")
    line = next((n for n, content in enumerate(lines, 1) if pattern.match(content)), None)
    return Problem(str(path), line, field, text)


class FixedPolicy:
    """A policy source that never reloads."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def poll(self, *, force: bool = False) -> tuple[Policy, str | None]:  # noqa: ARG002 - protocol signature
        return self.policy, None
