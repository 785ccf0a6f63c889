"""Read a policy file and report every problem at once, each with file, line and field path."""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError, YAMLWarning
from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode

from autoscaler.policy.model import DEFER_SEMANTIC_CHECKS, Policy, PoolPolicy, semantic_errors

__all__ = ["PolicyError", "Problem", "load_policy", "parse_policy"]

Loc = tuple[str | int, ...]
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
        # One problem, one line: parser messages span several, and a file's text may hold any character.
        message = " ".join(self.message.split())
        return f"{where}: {self.path}: {message}" if self.path else f"{where}: {message}"


class PolicyError(Exception):
    """A policy file that cannot be used; `problems` lists every issue found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def load_policy(path: str | Path) -> Policy:
    """Read and validate the policy file at `path`; raises PolicyError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError([Problem(str(p), None, "", f"cannot read the policy file: {exc.strerror or exc}")]) from exc
    return parse_policy(text, source=str(p))


def parse_policy(text: str, *, source: str = "<policy>") -> Policy:
    """Validate policy YAML text; raises PolicyError listing every problem with its line."""
    data = _parse_yaml(text, source)
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
        raise PolicyError(sorted(problems, key=lambda p: (p.line or 0, p.path)))
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


def _parse_yaml(text: str, source: str) -> Any:
    yaml = YAML(typ="rt")
    try:
        with warnings.catch_warnings():
            # A reused anchor (and the like) makes the file ambiguous: refuse it, located, like an error.
            warnings.simplefilter("error", YAMLWarning)
            return yaml.load(io.StringIO(text))
    except YAMLWarning as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else (_failing_line(text) or 1)
        raise PolicyError([Problem(source, line, "", f"ambiguous YAML: {exc}")]) from exc
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else (_failing_line(text) or 1)
        what = " ".join(s for s in (exc.context, exc.problem) if s)
        raise PolicyError([Problem(source, line, "", f"invalid YAML: {what}")]) from exc
    except YAMLError as exc:
        position = getattr(exc, "position", None)  # a ReaderError (a control character) has only an offset
        line = text.count("\n", 0, position) + 1 if isinstance(position, int) else (_failing_line(text) or 1)
        raise PolicyError([Problem(source, line, "", f"invalid YAML: {exc}")]) from exc
    except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
        # A value the parser accepted but cannot build, e.g. `!!int 15s` (int('15s') raises ValueError with
        # no position): find the node that fails alone to say where.
        line = _failing_line(text) or 1
        raise PolicyError([Problem(source, line, "", f"invalid YAML value: {exc}")]) from exc


def _failing_line(text: str) -> int | None:
    """1-based line of the first scalar that cannot be constructed on its own, if any."""
    yaml = YAML(typ="rt")
    try:
        root = yaml.compose(io.StringIO(text))
    except Exception:
        return None
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        if isinstance(node, ScalarNode):
            try:
                yaml.constructor.construct_object(node, deep=True)
            except Exception:
                return int(node.start_mark.line) + 1
        elif isinstance(node, SequenceNode):
            stack.extend(reversed(node.value))
        elif isinstance(node, MappingNode):
            for key, value in reversed(node.value):
                stack.extend((value, key))
    return None


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
            text = str(part)
            out += ("." if out else "") + (text if _PLAIN_KEY.match(text) else repr(part))
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
            if isinstance(node, dict) and part in node:
                if lc is not None:
                    line = lc.key(part)[0] + 1
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                if lc is not None:
                    line = lc.item(part)[0] + 1
                node = node[part]
            else:
                break
        except (KeyError, IndexError, TypeError, AttributeError):
            break
    return line
