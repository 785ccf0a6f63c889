"""Turn a policy file's bytes into plain YAML data, refusing anything hostile with the line it is on.

Whoever can write the policy file can put any bytes in it, so each stage is bounded and every refusal is a
`Refusal(line, message)`, never another exception:

- reading: regular files only (a FIFO would block the read, /dev/zero would never end), at most
  MAX_POLICY_BYTES. ruamel's parser is pure Python (~50 KB/s on dense YAML) and a reload runs inside a tick,
  so the bounds keep a hostile version's one parse under a second (bench/policy_parse_cost.py) while 128 KiB
  and 20,000 values still hold ~250 pools (the shipped policies take ~520 bytes and ~46 values a pool);
- decoding: UTF-8 (a UTF-8 byte-order mark is dropped; UTF-16/32 ones are refused by name); a bad byte, a
  control character, or a line separator that editors and the parser count differently is refused at its line;
- parsing: explicit tags are limited to YAML's core ones and must fit their value (nothing is ever built
  from `!!python/...` or a local tag); an anchor is defined once and no alias refers to the node it sits in;
  nesting is at most MAX_DEPTH levels and the document at most MAX_NODES values, counting each alias as a
  copy of what it refers to (a "billion laughs" or a quadratic merge chain stops at the line that passes it);
- building: a value the parser accepted but cannot build (`2001-13-45`, `0b_`) is refused at its node.
"""

from __future__ import annotations

import os
import re
import stat
import unicodedata
import warnings
from pathlib import Path
from typing import Any, BinaryIO

from ruamel.yaml import YAML
from ruamel.yaml.composer import Composer
from ruamel.yaml.constructor import RoundTripConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError, YAMLWarning
from ruamel.yaml.events import AliasEvent, MappingStartEvent, ScalarEvent, SequenceStartEvent
from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode

__all__ = [
    "MAX_DEPTH", "MAX_NODES", "MAX_POLICY_BYTES", "Refusal", "bounded", "decode_policy", "load_yaml",
    "read_policy_bytes", "read_policy_stream",
]

MAX_POLICY_BYTES = 128 * 1024
MAX_DEPTH = 64
MAX_NODES = 20_000

_CORE = "tag:yaml.org,2002:"
_SCALAR_TAGS = {f"{_CORE}{t}" for t in ("str", "int", "float", "bool", "null")}
_TAG_KIND = {f"{_CORE}map": "mapping", f"{_CORE}seq": "list", **dict.fromkeys(_SCALAR_TAGS, "scalar")}
_BOMS = (
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe\x00\x00", "UTF-32"),  # before UTF-16's: it starts with the same two bytes
    (b"\xfe\xff", "UTF-16"),
    (b"\xff\xfe", "UTF-16"),
)
# What YAML forbids in a stream (C0 and C1 controls, surrogates, U+FFFE/U+FFFF), and the separators that the
# parser counts as line breaks but editors do not (NEL U+0085, U+2028, U+2029): refused, so lines agree.
_FORBIDDEN_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\ufffe\uffff]")
_BREAK = re.compile(r"\r\n|\r|\n")
_BREAK_BYTES = re.compile(rb"\r\n|\r|\n")


class Refusal(Exception):  # noqa: N818 - a refusal is the expected outcome of hostile input, not a fault
    """The file cannot be used; `line` is 1-based (None when the problem is the file, not a line of it)."""

    def __init__(self, line: int | None, message: str, path: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.line = line
        self.message = message
        self.path = path  # keys and list indexes down to the value, where known


def read_policy_bytes(path: Path) -> bytes:
    """The file's bytes, at most MAX_POLICY_BYTES of them; raises Refusal (OSError's text included)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below like any non-regular file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb", closefd=True) as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise Refusal(None, "cannot read the policy file: it is not a regular file")
            data = f.read(MAX_POLICY_BYTES + 1)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise Refusal(None, f"cannot read the policy file: {getattr(exc, 'strerror', None) or exc}") from exc
    return bounded(data)


def read_policy_stream(stream: BinaryIO) -> bytes:
    """A policy read from a stream (`validate -`: a pipe, e.g. `docker run -i ... validate - <policy.yaml`),
    at most MAX_POLICY_BYTES; raises Refusal. Only for a one-shot command: the watcher reads regular files."""
    try:
        data = stream.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise Refusal(None, f"cannot read the policy: {exc.strerror or exc}") from exc
    return bounded(data)


def bounded(data: bytes) -> bytes:
    """`data` if it is at most MAX_POLICY_BYTES long; raises Refusal at the line that passes the bound."""
    if len(data) > MAX_POLICY_BYTES:
        line = len(_BREAK_BYTES.findall(data, 0, MAX_POLICY_BYTES)) + 1
        raise Refusal(
            line,
            f"the file is larger than {MAX_POLICY_BYTES // 1024} KiB (it passes the bound on this line); "
            "a policy takes a few KiB: is this the right file?",
        )
    return data


def decode_policy(data: bytes) -> str:
    """UTF-8 text of the file without its byte-order mark, checked by `check_characters`; raises Refusal."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            raise Refusal(
                1, f"the file is {encoding}-encoded (it starts with a {encoding} byte-order mark): save it as UTF-8"
            )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = len(_BREAK_BYTES.findall(data, 0, exc.start)) + 1
        line_start = max(data.rfind(b"\n", 0, exc.start), data.rfind(b"\r", 0, exc.start)) + 1
        raise Refusal(
            line,
            f"byte 0x{data[exc.start]:02x} (byte {exc.start - line_start + 1} of the line) is not UTF-8: "
            "save the file as UTF-8",
        ) from exc
    check_characters(text)
    return text


def check_characters(text: str) -> None:
    """Refuse a character YAML forbids, or a line separator the parser and editors count differently."""
    if (bad := _FORBIDDEN_CHAR.search(text)) is None:
        return
    char, at = bad.group(), bad.start()
    line = len(_BREAK.findall(text, 0, at)) + 1
    column = at - max(text.rfind("\n", 0, at), text.rfind("\r", 0, at))
    name = unicodedata.name(char, "a control character")
    hint = " (a binary file, or UTF-16 without a byte-order mark?)" if char == "\x00" else ""
    raise Refusal(line, f"character U+{ord(char):04X} ({name}) at column {column} is not allowed in a policy{hint}")


def load_yaml(text: str) -> Any:
    """The ruamel round-trip data of `text` (line numbers kept for the field errors); raises Refusal."""
    yaml = YAML(typ="rt")
    yaml.Composer = _GuardedComposer
    yaml.Constructor = _GuardedConstructor
    try:
        with warnings.catch_warnings():
            # A warning means the file reads two ways (e.g. a YAML 1.1 float): refuse it, like an error.
            warnings.simplefilter("error", YAMLWarning)
            return yaml.load(text)
    except Refusal:
        raise
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = " ".join(s for s in (exc.context, exc.problem) if s)
        if "'\\t'" in what:
            what += " (YAML is indented with spaces, never tabs)"
        raise Refusal(mark.line + 1 if mark is not None else 1, f"invalid YAML: {what}") from exc
    except (YAMLError, YAMLWarning) as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        raise Refusal(mark.line + 1 if mark is not None else 1, f"invalid YAML: {exc}") from exc


def _short(tag: str) -> str:
    return "!!" + tag.removeprefix(_CORE) if tag.startswith(_CORE) else tag


def _clip(text: str, size: int = 60) -> str:
    return text if len(text) <= size else text[:size] + "..."


class _GuardedComposer(Composer):
    """ruamel's composer with the checks of the module docstring, each raised at the event's line."""

    def __init__(self, loader: Any = None) -> None:
        super().__init__(loader)
        self._depth = 0
        self._open_anchors: set[str] = set()
        # Values in the document so far, each alias counted as a copy of what it refers to: what the later
        # stages (merges, validation, error listing) may walk. Checked as it grows, so composing stops at
        # the line that passes the bound instead of after a quadratic merge chain.
        self._values = 0
        self._expanded: dict[int, int] = {}  # id(node) -> values in it, aliases expanded
        self._path: list[str | int] = []
        self.paths: dict[int, tuple[str | int, ...]] = {}  # id(node) -> its field path, for the constructor

    def compose_node(self, parent: Any, index: Any) -> Any:
        # ruamel composes a mapping's key with index None, its value with the key node as index, and a list's
        # item with its position: the field path, for the problems raised here and by the constructor.
        if isinstance(parent, MappingNode) and index is not None:
            self._path.append(str(index.value) if isinstance(index, ScalarNode) else "?")
        elif isinstance(parent, SequenceNode):
            self._path.append(index)
        else:
            self._path.append("")  # the root, or a key: named by its mapping's path
        try:
            return self._compose_node(parent, index)
        finally:
            self._path.pop()

    def _refusal(self, line: int, message: str) -> Refusal:
        return Refusal(line, message, tuple(step for step in self._path if step != ""))

    def _compose_node(self, parent: Any, index: Any) -> Any:
        event = self.parser.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, AliasEvent):
            if event.anchor in self._open_anchors:
                raise self._refusal(line, f"the alias *{event.anchor} refers to the node it is part of (a loop)")
            node = super().compose_node(parent, index)  # an undefined alias raises here
            self._check_key(parent, index, node, line)
            self._count(self._expanded[id(node)], line)
            return node
        anchor = event.anchor
        if anchor is not None and anchor in self.anchors:
            first = self.anchors[anchor].start_mark.line + 1
            raise self._refusal(line, f"the anchor &{anchor} is defined twice (first on line {first}): rename one")
        self._check_tag(event, line)
        self._count(1, line)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise self._refusal(line, f"the document is nested more than {MAX_DEPTH} levels deep")
        if anchor is not None:
            self._open_anchors.add(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor is not None:
                self._open_anchors.discard(anchor)
        children = node.value if isinstance(node, SequenceNode) else ()
        if isinstance(node, MappingNode):
            children = [child for pair in node.value for child in pair]
        self._expanded[id(node)] = 1 + sum(self._expanded[id(child)] for child in children)
        self.paths[id(node)] = tuple(step for step in self._path if step != "")
        self._check_key(parent, index, node, line)
        return node

    def _check_key(self, parent: Any, index: Any, node: Any, line: int) -> None:
        # A list or a mapping as a key names nothing in a policy, and ruamel cannot hash a mapping nested in one.
        if isinstance(parent, MappingNode) and index is None and not isinstance(node, ScalarNode):
            kind = "list" if isinstance(node, SequenceNode) else "mapping"
            raise self._refusal(line, f"a {kind} is used as a key: the keys of a policy are names")

    def _count(self, values: int, line: int) -> None:
        self._values += values
        if self._values > MAX_NODES:
            raise self._refusal(
                line, f"the document holds more than {MAX_NODES:,} values here (each alias counted as a copy "
                "of what it refers to)"
            )

    def _check_tag(self, event: Any, line: int) -> None:
        tag = event.ctag
        if tag is None or str(tag) == "!":
            return  # no tag: the parser infers it from the value (only core types and timestamps)
        name = str(tag)
        kind = _TAG_KIND.get(name)
        if kind is None:
            raise self._refusal(
                line, f"the tag {_clip(_short(name))} is not allowed: a policy is plain YAML (strings, numbers, "
                "booleans, null, lists and mappings)"
            )
        actual = {ScalarEvent: "scalar", SequenceStartEvent: "list", MappingStartEvent: "mapping"}[type(event)]
        if actual != kind:
            raise self._refusal(line, f"the tag {_short(name)} needs a {kind}, not a {actual}")
        if name in _SCALAR_TAGS - {f"{_CORE}str"}:
            inferred = str(self.resolver.resolve(ScalarNode, event.value, (True, False)))
            if inferred != name and (name, inferred) != (f"{_CORE}float", f"{_CORE}int"):
                shown = f"{_short(name)} {_clip(event.value)!r}"
                raise self._refusal(line, f"{shown}: the value is not a valid {_short(name)[2:]}")


class _GuardedConstructor(RoundTripConstructor):
    """ruamel's round-trip constructor, with a value it cannot build refused at that value's line."""

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (Refusal, MarkedYAMLError):
            raise
        except Exception as exc:
            value = f" {_clip(node.value)!r}" if isinstance(node, ScalarNode) else ""
            raise Refusal(
                node.start_mark.line + 1, f"cannot read the value{value} as {_short(str(node.tag))}: {exc}",
                self._path_of(node),
            ) from exc

    def _path_of(self, node: Any) -> tuple[str | int, ...]:
        paths: dict[int, tuple[str | int, ...]] = getattr(getattr(self.loader, "composer", None), "paths", {})
        return paths.get(id(node), ())

    # ruamel's round-trip constructor itself changes the signature of its base classes' method.
    def construct_mapping(self, node: Any, maptyp: Any, deep: bool = False) -> Any:  # type: ignore[override]
        # Runs in the parent's generator, outside construct_object's guard above: located at the mapping.
        try:
            return super().construct_mapping(node, maptyp, deep=deep)
        except (Refusal, MarkedYAMLError):
            raise
        except Exception as exc:
            raise Refusal(node.start_mark.line + 1, f"cannot read this mapping: {exc}", self._path_of(node)) from exc
