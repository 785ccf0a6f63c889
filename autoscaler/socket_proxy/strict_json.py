"""JSON as the proxy accepts it: one object, ASCII keys unique even when compared as Go compares them.

Go's decoder (the engine's) matches keys case-insensitively and takes the last of two duplicates, so
`{"Privileged": false, "privileged": true}` means privileged to the engine. Duplicates are therefore
refused after lowercasing ASCII keys; non-ASCII keys are refused outright (Go folds some of them onto ASCII
letters: U+017F long s is "s", U+212A Kelvin sign is "k"). NaN and Infinity are not JSON and are refused;
so is nesting deeper than any create body needs.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_DEPTH", "JsonRefusedError", "loads_object"]

MAX_DEPTH = 16


class JsonRefusedError(ValueError):
    """The body is not JSON the proxy accepts; the message says what and where."""


def _unique_ascii_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, str] = {}
    for key, _ in pairs:
        if not key.isascii():
            raise JsonRefusedError(f"non-ASCII key {key!r}")
        folded = key.lower()
        if folded in seen:
            raise JsonRefusedError(f"duplicate key {key!r} (also given as {seen[folded]!r})")
        seen[folded] = key
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise JsonRefusedError(f"{name} is not JSON")


def _depth(value: Any, limit: int, where: str = "$") -> None:
    if limit < 0:
        raise JsonRefusedError(f"nested deeper than {MAX_DEPTH} levels at {where}")
    if isinstance(value, dict):
        for key, item in value.items():
            _depth(item, limit - 1, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _depth(item, limit - 1, f"{where}[{index}]")


def loads_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or JsonRefusedError saying why not."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonRefusedError(f"not UTF-8 at byte {exc.start}") from None
    try:
        value = json.loads(text, object_pairs_hook=_unique_ascii_keys, parse_constant=_no_constant)
    except JsonRefusedError as exc:
        raise JsonRefusedError(f"invalid JSON body: {exc}") from None
    except json.JSONDecodeError as exc:
        raise JsonRefusedError(f"invalid JSON body: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise JsonRefusedError(f"invalid JSON body: nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(value, dict):
        raise JsonRefusedError(f"the JSON body is a {type(value).__name__}, not an object")
    _depth(value, MAX_DEPTH)
    return value
