"""Read a policy file and report every problem at once, each with file, line and field path."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError

from autoscaler.policy.model import DEFER_SEMANTIC_CHECKS, Policy, PoolPolicy, semantic_errors
from autoscaler.policy.untrusted_yaml import (
    Refusal,
    check_characters,
    decode_policy,
    load_yaml,
    read_policy_bytes,
    read_policy_stream,
)

__all__ = [
    "PolicyError", "Problem", "load_policy", "load_policy_stream", "parse_policy", "parse_policy_bytes",
    "read_policy_file",
]

Loc = tuple[str | int, ...]
MAX_LISTED = 100  # problems listed for one file; the rest are counted
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a policy file."""

    source: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        # One problem, one line: parser messages span several, and a file's text may hold any character
        # (and any length: a value quoted in a message is cut).
        message = _clip(" ".join(self.message.split()), 400)
        return f"{where}: {self.path}: {message}" if self.path else f"{where}: {message}"


class PolicyError(Exception):
    """A policy file that cannot be used; `problems` lists every issue found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def load_policy(path: str | Path) -> Policy:
    """Read and validate the policy file at `path`; raises PolicyError (and nothing else)."""
    return parse_policy_bytes(read_policy_file(path), source=str(path))


def read_policy_file(path: str | Path) -> bytes:
    """The policy file's bytes, bounded (see untrusted_yaml); raises PolicyError."""
    try:
        return read_policy_bytes(Path(path))
    except Refusal as exc:
        raise _refused(str(path), exc) from exc


def load_policy_stream(stream: BinaryIO, *, source: str = "<stdin>") -> Policy:
    """Read and validate a policy from a stream (`validate -`), bounded like a file; raises PolicyError."""
    try:
        data = read_policy_stream(stream)
    except Refusal as exc:
        raise _refused(source, exc) from exc
    return parse_policy_bytes(data, source=source)


def parse_policy_bytes(data: bytes, *, source: str = "<policy>") -> Policy:
    """Validate a policy file's bytes (UTF-8, an optional BOM); raises PolicyError and nothing else."""
    try:
        text = decode_policy(data)
    except Refusal as exc:
        raise _refused(source, exc) from exc
    return parse_policy(text, source=source)


def _refused(source: str, refusal: Refusal) -> PolicyError:
    """A refusal of the file's bytes (not of a field), as the one located problem it is."""
    return PolicyError([Problem(source, refusal.line, "", refusal.message)])


def parse_policy(text: str, *, source: str = "<policy>") -> Policy:
    """Validate policy YAML text; raises PolicyError listing every problem with its line, and nothing else."""
    try:
        return _parse_policy(text, source)
    except PolicyError:
        raise
    except Exception as exc:
        # A defect of ours, not of the file: still one located line (never a traceback that stops the
        # controller), and the fuzz tests fail on this message so it does not go unnoticed.
        message = f"internal error while reading the policy (please report it): {type(exc).__name__}: {exc}"
        raise PolicyError([Problem(source, 1, "", message)]) from exc


def _parse_policy(text: str, source: str) -> Policy:
    try:
        check_characters(text)
        data = load_yaml(text)
    except Refusal as exc:
        raise PolicyError([Problem(source, exc.line, _format_path(exc.path), exc.message)]) from exc
    if not isinstance(data, dict):
        raise PolicyError([Problem(source, 1, "", "the policy file must be a mapping with a `pools:` key")])
    pool_names = list(data["pools"].keys()) if isinstance(data.get("pools"), dict) else None

    def name_loc(loc: Loc) -> Loc:
        # The model holds pools as a list; ops wrote a mapping keyed by name, so speak in names.
        if pool_names and len(loc) >= 2 and loc[0] == "pools" and isinstance(loc[1], int):
            return ("pools", pool_names[loc[1]], *loc[2:])
        return loc

    problems: list[Problem] = []
    context = {DEFER_SEMANTIC_CHECKS: True}
    policy: Policy | None = None
    failed_pools: dict[int, set[str]] = {}
    try:
        policy = Policy.model_validate(data, context=context)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            if len(loc) >= 2 and loc[0] == "pools" and isinstance(loc[1], int):
                failed_pools.setdefault(loc[1], set()).update(str(part) for part in loc[2:3])
            problems.append(_problem(source, data, name_loc(loc), _message(err)))

    pools = (
        [(i, p, set()) for i, p in enumerate(policy.pools)]
        if policy is not None
        else _valid_pools(data, failed_pools, context)
    )
    for index, pool, failed_keys in pools:
        skip = set(failed_keys)
        if {"tiers", "per_replica"} & skip:
            skip |= {"tiers", "per_replica"}  # the strategy check would blame the dropped one
        for loc, message in semantic_errors(pool):
            if loc[0] in skip:
                continue
            full = name_loc(("pools", index, *loc))
            problems.append(_problem(source, data, full, message))
    if problems:
        problems.sort(key=lambda p: (p.line or 0, p.path))
        if len(problems) > MAX_LISTED:
            # Tens of thousands of wrong values fit in a file: a log line per value would drown the first ones.
            unlisted = len(problems) - MAX_LISTED
            more = Problem(source, problems[MAX_LISTED].line, "", f"{unlisted:,} more problems are not listed")
            problems = [*problems[:MAX_LISTED], more]
        raise PolicyError(problems)
    assert policy is not None  # no problems means pydantic accepted it
    return policy


# Stand-ins for required fields that no cross-field check reads, so a pool whose target or queues are
# wrong still gets its min/max/tier checks reported in the same run.
_STAND_INS: dict[str, Any] = {"target": {"compose": {"service": "_"}}, "queues": ["_"]}


def _valid_pools(
    data: dict[str, Any], failed: dict[int, set[str]], context: dict[str, bool]
) -> list[tuple[int, PoolPolicy, set[str]]]:
    """Pools to run the cross-field checks on while field validation failed somewhere, with the keys
    that failed (checks about those are left out: the field error already speaks for them).

    A pool with field errors is retried without the offending keys (defaults, or stand-ins for target and
    queues), so its remaining fields are still checked against each other.
    """
    raw = data.get("pools")
    if isinstance(raw, dict):
        items = [{"name": k, **v} if isinstance(v, dict) else v for k, v in raw.items()]
    elif isinstance(raw, list):
        items = list(raw)
    else:
        return []
    out: list[tuple[int, PoolPolicy, set[str]]] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        bad = failed.get(i, set())
        if bad - set(_STAND_INS) - {f for f in bad if f not in _REQUIRED}:
            continue  # a required field that the checks read (min, max) is itself broken
        candidate = {k: v for k, v in item.items() if k not in bad}
        candidate.update({k: v for k, v in _STAND_INS.items() if k in bad})
        try:
            out.append((i, PoolPolicy.model_validate(candidate, context=context), bad))
        except ValidationError:
            continue
    return out


_REQUIRED = {name for name, f in PoolPolicy.model_fields.items() if f.is_required()}


def _message(err: Any) -> str:
    kind, msg = err["type"], str(err["msg"])
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; `autoscaler schema` lists every key)"
    if kind == "missing":
        return "required key is missing"
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _format_path(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # A key may be anything YAML allows (null, a number, spaces): show it, quoted if odd, never fail on it.
            text = _clip(str(part), 60)
            out += ("." if out else "") + (text if _PLAIN_KEY.match(text) else repr(text))
    return out


def _problem(source: str, data: Any, loc: Loc, message: str) -> Problem:
    return Problem(source, _line_of(data, loc), _format_path(loc), message)


def _line_of(data: Any, loc: Loc) -> int | None:
    """1-based line of the deepest node of `loc` present in the ruamel tree (pydantic may add a
    trailing key that the file lacks, e.g. a missing field, so stop at the deepest one found)."""
    node, line = data, 1
    for part in loc:
        lc = getattr(node, "lc", None)
        try:
            if isinstance(node, dict) and (key := _key_named(node, part)) is not _ABSENT:
                if lc is not None:
                    line = lc.key(key)[0] + 1
                node = node[key]
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                if lc is not None:
                    line = lc.item(part)[0] + 1
                node = node[part]
            else:
                break
        except (KeyError, IndexError, TypeError, AttributeError):
            break
    return line


_ABSENT = object()


def _key_named(mapping: dict[Any, Any], part: str | int) -> Any:
    """The key of `mapping` that pydantic's loc `part` names: itself, or a non-string key (a list, a
    number) that pydantic reports by its text."""
    if part in mapping:
        return part
    return next((key for key in mapping if str(key) == str(part)), _ABSENT)


def _clip(text: str, size: int) -> str:
    return text if len(text) <= size else text[:size] + "..."
