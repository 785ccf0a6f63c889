"""Keeps the policy in force: reloads a changed file, and keeps the last good policy when an edit is bad."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from autoscaler.policy.load import PolicyError, Problem, parse_policy_bytes, read_policy_file
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
        data = read_policy_file(self.path)  # a bad file at start-up is fatal: nothing good to keep
        self._version: str = _version_of(data)
        self.policy: Policy = parse_policy_bytes(data, source=str(self.path))
        self.last_errors: list[str] = []

    def poll(self, *, force: bool = False) -> tuple[Policy, str | None]:
        """The policy to use now, and "reloaded" / "invalid" / None (unchanged).

        The bytes are read once (bounded) and both hashed and parsed, so the version judged is the version
        remembered: a bad version is logged and counted once, and the next edit is judged afresh."""
        try:
            data: bytes | PolicyError = read_policy_file(self.path)
        except PolicyError as exc:
            data = exc
        version = _version_of(data) if isinstance(data, bytes) else f"unreadable: {data}"
        if not force and version == self._version:
            return self.policy, None
        self._version = version
        if isinstance(data, PolicyError):
            return self._refuse(data)
        try:
            policy = parse_policy_bytes(data, source=str(self.path))
        except PolicyError as exc:
            return self._refuse(exc)
        if self._check is not None and (messages := self._check(policy)):
            return self._refuse(PolicyError([_located(self.path, data, message) for message in messages]))
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


def _version_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _located(path: Path, data: bytes, message: str) -> Problem:
    """A problem about a top-level field (`field: message`), at the line that sets it."""
    field, _, text = message.partition(": ")
    lines = data.decode("utf-8", errors="replace").splitlines()
    pattern = re.compile(rf"^{re.escape(field)}\s*:")
    line = next((n for n, content in enumerate(lines, 1) if pattern.match(content)), None)
    return Problem(str(path), line, field, text)


class FixedPolicy:
    """A policy source that never reloads."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def poll(self, *, force: bool = False) -> tuple[Policy, str | None]:  # noqa: ARG002 - protocol signature
        return self.policy, None
