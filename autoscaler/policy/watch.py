"""Keeps the policy in force: reloads a changed file, and keeps the last good policy when an edit is bad."""

from __future__ import annotations

import hashlib
from pathlib import Path

from loguru import logger

from autoscaler.policy.load import PolicyError, load_policy
from autoscaler.policy.model import Policy

__all__ = ["FixedPolicy", "PolicyWatcher"]


class PolicyWatcher:
    """Compares the file's content hash at each poll rather than its mtime: editors that replace the file,
    mounts that swap a symlink, and two edits within one second are all seen."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
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
            self.last_errors = [str(p) for p in exc.problems]
            logger.bind(errors=self.last_errors).error(
                "policy {} is invalid; keeping the last good policy:\n{}", self.path, exc
            )
            return self.policy, "invalid"
        self.policy = policy
        self.last_errors = []
        logger.info("policy {} reloaded ({} pools)", self.path, len(policy.pools))
        return self.policy, "reloaded"

    def _read_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None


class FixedPolicy:
    """A policy source that never reloads."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def poll(self, *, force: bool = False) -> tuple[Policy, str | None]:  # noqa: ARG002 - protocol signature
        return self.policy, None
