"""Any bytes in a policy file give located problems, never a traceback: `validate`, start-up and reloads.

A policy file is read as bytes (bounded), decoded as UTF-8 (a bad byte is reported at its line), and parsed
by a guarded YAML reader: explicit tags outside YAML's core set are refused (nothing is ever constructed
from `!!python/...`), anchors are unique, aliases cannot refer to themselves or expand past a bound,
nesting is bounded. (Trust boundaries III, defect 6.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoscaler.backends.memory import MemoryBackend
from autoscaler.policy.load import PolicyError, load_policy
from autoscaler.policy.model import Policy
from autoscaler.policy.watch import PolicyWatcher
from tests.test_loop import make_controller

ROOT = Path(__file__).resolve().parent.parent
SEEDS = [
    ROOT / "policies" / "default.yaml",
    ROOT / "policies" / "swarm.yaml",
    ROOT / "tests" / "e2e" / "policy.yaml",
    *sorted((ROOT / "tests" / "fixtures" / "policies" / "valid").glob("*.yaml")),
]
SEED_BYTES = [p.read_bytes() for p in SEEDS]

GOOD = b"""interval: 15s
pools:
  fast:
    target: {compose: {service: w}}
    queues: [fast]
    min: 1
    max: 4
    per_replica: {value: 5}
"""


def _with_line(line: int, content: bytes, *, replace: bool = True) -> bytes:
    """GOOD with its 1-based `line` replaced by (or preceded by) `content`."""
    lines = GOOD.splitlines(keepends=True)
    lines[line - 1 : line if replace else line - 1] = [content]
    return b"".join(lines)


LAUGHS = b"".join(
    [b"interval: 15s\nx0: &l0 [a, a, a, a, a, a, a, a, a, a]\n"]
    + [b"x%d: &l%d [%s]\n" % (i, i, b", ".join([b"*l%d" % (i - 1)] * 10)) for i in range(1, 10)]
)

# (id, file bytes, line of the first problem, a fragment of its message)
HOSTILE = [
    ("latin1-byte-in-a-comment", _with_line(6, b"    # caf\xe9 au lait\n", replace=False), 6, "UTF-8"),
    ("latin1-byte-in-a-value", _with_line(5, b"    queues: [caf\xe9]\n"), 5, "UTF-8"),
    ("truncated-utf8", GOOD + b"# \xe2\x82", 9, "UTF-8"),
    ("omap-on-a-scalar", _with_line(6, b"    min: !!omap x\n"), 6, "!!omap"),
    ("set-on-a-scalar", _with_line(6, b"    min: !!set x\n"), 6, "!!set"),
    ("bool-tag-on-2", GOOD + b"    scale_in: !!bool 2\n", 9, "!!bool"),
    ("float-tag-on-empty", _with_line(1, b"interval: !!float ''\n"), 1, "!!float"),
    ("int-tag-on-empty", _with_line(6, b"    min: !!int ''\n"), 6, "!!int"),
    ("int-tag-on-15s", _with_line(1, b"interval: !!int 15s\n"), 1, "!!int"),
    ("map-tag-on-a-scalar", _with_line(6, b"    min: !!map x\n"), 6, "!!map"),
    ("str-tag-on-a-list", _with_line(5, b"    queues: !!str [fast]\n"), 5, "!!str"),
    ("timestamp-out-of-range", _with_line(1, b"interval: 2001-13-45\n"), 1, "month"),
    ("duplicate-anchor", _with_line(7, b"    max: &n 4\n", replace=True).replace(b"min: 1", b"min: &n 1"), 7, "&n"),
    ("nul-byte", _with_line(6, b"    # a\x00b\n", replace=False), 6, "U+0000"),
    ("bell-in-a-value", _with_line(5, b"    queues: [fa\x07st]\n"), 5, "U+0007"),
    ("del-char", _with_line(5, b"    queues: [fa\x7fst]\n"), 5, "U+007F"),
    ("c1-next-line", _with_line(5, b"    queues: [fa\xc2\x85st]\n"), 5, "U+0085"),
    ("unicode-line-separator", _with_line(5, b"    queues: [fa\xe2\x80\xa8st]\n"), 5, "U+2028"),
    ("noncharacter-fffe", _with_line(5, b"    queues: [fa\xef\xbf\xbest]\n"), 5, "U+FFFE"),
    ("utf16-le-with-bom", GOOD.decode().encode("utf-16"), 1, "UTF-16"),
    ("utf16-be-with-bom", b"\xfe\xff" + GOOD.decode().encode("utf-16-be"), 1, "UTF-16"),
    ("utf32-with-bom", GOOD.decode().encode("utf-32"), 1, "UTF-32"),
    ("utf16-without-bom", GOOD.decode().encode("utf-16-le"), 1, "U+0000"),
    ("python-object-apply", _with_line(5, b"    queues: !!python/object/apply:os.system [fast]\n"), 5, "tag"),
    ("python-name", _with_line(6, b"    min: !!python/name:os.system\n"), 6, "tag"),
    ("local-tag", _with_line(6, b"    min: !one 1\n"), 6, "tag"),
    ("verbatim-tag", _with_line(6, b"    min: !<tag:example.com,2024:x> 1\n"), 6, "tag"),
    ("tag-directive-to-python", b"%TAG !e! tag:yaml.org,2002:python/\n---\n" + GOOD.replace(
        b"queues: [fast]", b"queues: !e!object/apply:os.system [fast]"), 7, "tag"),
    ("recursive-alias", _with_line(5, b"    queues: &q [fast, *q]\n"), 5, "*q"),
    ("billion-laughs", LAUGHS + GOOD.split(b"\n", 1)[1].replace(b"queues: [fast]", b"queues: *l9"), 6, "alias"),
    ("deep-flow-nesting", _with_line(5, b"    queues: " + b"[" * 100_000 + b"\n"), 5, "nested"),
    ("deep-block-nesting", GOOD + b"".join(b"  " * i + b"k:\n" for i in range(2, 300)), 70, "nested"),
    ("merge-of-a-scalar", _with_line(4, b"    <<: 1\n", replace=False), 4, "mapping"),
    ("tab-indent", _with_line(6, b"\tmin: 1\n"), 6, "tab"),
    ("a-list-as-a-key", _with_line(6, b"    ? [a, b]\n    : 1\n", replace=False), 6, "key"),
    ("a-mapping-as-a-key", _with_line(6, b"    ? {a: {b: c}}\n    : 1\n", replace=False), 6, "key"),
    ("an-alias-to-a-list-as-a-key",
     _with_line(6, b"    *q : 1\n", replace=False).replace(b"[fast]", b"&q [fast]"), 6, "key"),
    ("a-very-long-key", _with_line(6, b"    " + b"k" * 5000 + b": 1\n"), 6, ""),
    ("a-very-long-explicit-key", _with_line(6, b"    ? " + b"k" * 5000 + b"\n    : 1\n", replace=False), 6, "unknown"),
    ("yaml-version-3", b"%YAML 3.0\n---\n" + GOOD, 1, "version"),
    ("oversized", GOOD + (b"#" + b"x" * 1023 + b"\n") * 300, 136, "KiB"),
]


@pytest.fixture
def policy_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="policy-bytes-") as d:
        yield Path(d)


def _located(problems: list[str], source: str) -> None:
    pattern = re.compile(rf"^{re.escape(source)}:([1-9]\d*): \S")
    assert problems
    for problem in problems:
        assert pattern.match(problem), f"not located: {problem!r}"
        assert "\n" not in problem and len(problem) < 1200, f"not one short line: {problem[:300]!r}..."


def _refusal(path: Path) -> PolicyError:
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    return caught.value


@pytest.mark.parametrize(("content", "line", "fragment"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_a_hostile_file_is_refused_at_its_line(
    policy_dir: Path, capfd: pytest.CaptureFixture[str], content: bytes, line: int, fragment: str
) -> None:
    path = policy_dir / "p.yaml"
    path.write_bytes(content)
    problems = _refusal(path).problems
    _located([str(p) for p in problems], str(path))
    assert problems[0].line == line, [str(p) for p in problems]
    assert fragment in problems[0].message, [str(p) for p in problems]
    assert capfd.readouterr() == ("", ""), "nothing printed besides the located problems"


def test_thousands_of_problems_are_summed_up_not_all_listed(policy_dir: Path) -> None:
    """A file can hold thousands of wrong values: the first 100 problems are listed, then a count."""
    path = policy_dir / "p.yaml"
    path.write_bytes(_with_line(5, b"    queues: [" + b"[], " * 4_999 + b"[]]\n"))
    problems = _refusal(path).problems
    assert len(problems) == 101, len(problems)
    _located([str(p) for p in problems], str(path))
    assert problems[-1].message == "4,900 more problems are not listed", problems[-1]


@pytest.mark.parametrize(
    ("content", "where"),
    [
        pytest.param(GOOD + b"    scale_in: !!bool 2\n", ":9: pools.fast.scale_in: ", id="bool-tag"),
        pytest.param(_with_line(1, b"interval: !!float ''\n"), ":1: interval: ", id="float-tag"),
        pytest.param(_with_line(1, b"interval: 2001-13-45\n"), ":1: interval: ", id="timestamp"),
        pytest.param(_with_line(7, b"    max: &n 4\n").replace(b"min: 1", b"min: &n 1"), ":7: pools.fast.max: ",
                     id="duplicate-anchor"),
        pytest.param(_with_line(5, b"    queues: [fast, !!set x]\n"), ":5: pools.fast.queues[1]: ", id="set-tag"),
    ],
)
def test_a_refusal_by_the_yaml_reader_names_its_field(policy_dir: Path, content: bytes, where: str) -> None:
    path = policy_dir / "p.yaml"
    path.write_bytes(content)
    assert str(_refusal(path).problems[0]).startswith(f"{path}{where}")


def test_a_python_tag_never_runs(policy_dir: Path) -> None:
    """A `!!python/object/apply` tag is refused, not turned into plain data, and never calls anything."""
    canary = policy_dir / "pwned"
    path = policy_dir / "p.yaml"
    path.write_bytes(_with_line(5, f"    queues: !!python/object/apply:os.system ['touch {canary}']\n".encode()))
    assert "tag" in _refusal(path).problems[0].message
    assert not canary.exists()


def test_a_utf8_bom_is_accepted(policy_dir: Path) -> None:
    path = policy_dir / "p.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD)
    assert [p.name for p in load_policy(path).pools] == ["fast"]


def test_merge_keys_and_aliases_in_their_ordinary_use_are_accepted(policy_dir: Path) -> None:
    path = policy_dir / "p.yaml"
    path.write_bytes(
        GOOD
        + b"""    stop_timeout: &grace 2m
  slow:
    <<: {min: 1, max: 4, per_replica: {value: 5}}
    target: {compose: {service: v}}
    queues: [slow]
    stop_timeout: *grace
"""
    )
    policy = load_policy(path)
    assert [(p.name, p.max, p.stop_timeout) for p in policy.pools] == [("fast", 4, 120), ("slow", 4, 120)]


def test_a_file_that_is_not_a_regular_file_is_refused_without_reading_it(policy_dir: Path) -> None:
    """A FIFO would block the read forever and /dev/zero would never end: both are refused at once."""
    fifo = policy_dir / "fifo.yaml"
    os.mkfifo(fifo)
    result: list[BaseException | Policy] = []
    reader = threading.Thread(target=lambda: result.append(_catch(fifo)), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # unblock the reader so the test ends
        with open(fifo, "wb"):
            pass
        reader.join(10)
        pytest.fail("reading a FIFO blocked")
    assert isinstance(result[0], PolicyError) and "regular file" in result[0].problems[0].message
    assert "regular file" in _catch(Path("/dev/zero")).problems[0].message  # type: ignore[union-attr]


def test_a_policy_file_swapped_for_a_fifo_is_refused_by_the_watcher_without_blocking(policy_dir: Path) -> None:
    path = policy_dir / "p.yaml"
    path.write_bytes(GOOD)
    watcher = PolicyWatcher(path)
    path.unlink()
    os.mkfifo(path)
    result: list[tuple[Policy, str | None]] = []
    poller = threading.Thread(target=lambda: result.append(watcher.poll()), daemon=True)
    poller.start()
    poller.join(10)
    if poller.is_alive():
        with open(path, "wb"):
            pass
        poller.join(10)
        pytest.fail("polling a FIFO blocked")
    assert result == [(watcher.policy, "invalid")]
    assert watcher.last_errors == [f"{path}: cannot read the policy file: it is not a regular file"]


def _catch(path: Path) -> BaseException | Policy:
    try:
        return load_policy(path)
    except PolicyError as exc:
        return exc


# -- the CLI -----------------------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autoscaler.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_validate_reports_every_hostile_file_located_and_exits_1(policy_dir: Path) -> None:
    files = []
    for name, content, _, _ in HOSTILE:
        files.append(policy_dir / f"{name}.yaml")
        files[-1].write_bytes(content)
    out = _cli("validate", *map(str, files))
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    lines = out.stderr.splitlines()
    for path in files:
        _located([line for line in lines if line.startswith(f"{path}:")], str(path))
    assert all(any(line.startswith(f"{path}:") for path in files) for line in lines), out.stderr


def test_run_with_a_hostile_file_exits_with_the_located_error(policy_dir: Path) -> None:
    """At start there is no good policy to keep: `run` prints where the file is wrong and exits non-zero."""
    path = policy_dir / "p.yaml"
    path.write_bytes(_with_line(6, b"    # caf\xe9\n", replace=False))
    out = _cli("run", "--once", "--policy", str(path), env={"AUTOSCALER_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    assert re.search(rf"^{re.escape(str(path))}:6: .*UTF-8", out.stderr, re.MULTILINE), out.stderr


# -- a running controller's reload -------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "line"), [c[1:3] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_a_hostile_edit_is_logged_once_and_the_last_good_policy_stays(
    policy_dir: Path, logs: list[str], content: bytes, line: int
) -> None:
    path = policy_dir / "p.yaml"
    path.write_bytes(GOOD)
    watcher = PolicyWatcher(path)
    good = watcher.policy
    path.write_bytes(content)
    assert watcher.poll() == (good, "invalid")
    _located(watcher.last_errors, str(path))
    assert watcher.last_errors[0].startswith(f"{path}:{line}: ")
    assert len([m for m in logs if "is invalid" in m]) == 1
    assert watcher.poll() == (good, None), "the same bad version is reported once"
    assert len([m for m in logs if "is invalid" in m]) == 1
    path.write_bytes(GOOD.replace(b"max: 4", b"max: 5"))
    policy, event = watcher.poll()
    assert (event, policy.pools[0].max) == ("reloaded", 5)


def test_the_controller_counts_a_hostile_edit_and_keeps_deciding(
    redis_url: str, policy_dir: Path, logs: list[str]
) -> None:
    """Controller.tick after a bad edit counts it once (result="invalid") and still decides on the last good
    policy; the ticks after it neither raise nor count it again."""
    path = policy_dir / "p.yaml"
    path.write_bytes(GOOD)
    controller = make_controller(redis_url, path, MemoryBackend({"w": 1}))
    controller.tick()
    path.write_bytes(_with_line(6, b"    min: !!omap x\n"))
    for _ in range(3):
        report = controller.tick()
        assert [p.decision.pool for p in report.pools] == ["fast"]
    invalid = controller.metrics.registry.get_sample_value("autoscaler_policy_reloads_total", {"result": "invalid"})
    assert invalid == 1
    assert len([m for m in logs if "is invalid" in m and f"{path}:6: " in m]) == 1


# -- fuzz: bytes and tags ----------------------------------------------------------------------------------

TAGS = [
    b"!!omap", b"!!set", b"!!pairs", b"!!bool", b"!!int", b"!!float", b"!!str", b"!!null", b"!!map", b"!!seq",
    b"!!binary", b"!!timestamp", b"!!merge", b"!!value", b"!!python/object/apply:os.system", b"!!python/name:os.path",
    b"!!python/tuple", b"!foo", b"!", b"!<tag:yaml.org,2002:int>", b"!e!x",
]
SNIPPETS = [
    b"&a ", b"*a", b"&a [*a]", b"<<: *a", b"<<: ", b"? ", b"''", b"x", b"2", b"[", b"{", b"]", b"}", b", ", b": ",
    b"- ", b"\t", b"#", b"---\n", b"...\n", b"%YAML 1.1\n", b"%TAG !e! tag:yaml.org,2002:\n", b"\r", b"\r\n", b"\n",
    b"\xef\xbb\xbf", b"\xff\xfe", b"\x00", b"\xe9", b"\xc2\x85", b"\xe2\x80\xa8", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
    b"2001-13-45", b".nan", b"1e999", b"|\n", b">-\n", b'"\\x00"', b'"\\ud800"', b"\\",
]


@st.composite
def hostile_policy_bytes(draw: st.DrawFn) -> bytes:
    """A shipped policy with a few byte-level edits: random bytes, tags, anchors, aliases, YAML punctuation."""
    data = bytearray(draw(st.sampled_from(SEED_BYTES)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["bytes", "tag", "snippet", "delete", "replace-value"]))
        if kind == "bytes":
            data[at:at] = draw(st.binary(min_size=1, max_size=6))
        elif kind == "tag":
            data[at:at] = draw(st.sampled_from(TAGS)) + b" "
        elif kind == "snippet":
            data[at:at] = draw(st.sampled_from(SNIPPETS))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:  # the value after the next ': ' gets a tag or an anchor or an alias
            colon = data.find(b": ", at)
            if colon >= 0:
                data[colon + 2 : colon + 2] = draw(st.sampled_from([*TAGS, b"&a", b"&b", b"*a"])) + b" "
    return bytes(data)


def check_policy_bytes(content: bytes, path: Path) -> None:
    """The property: a policy, or a non-empty list of located one-line problems; nothing else escapes."""
    path.write_bytes(content)
    outcome = _catch(path)
    if isinstance(outcome, PolicyError):
        _located([str(p) for p in outcome.problems], str(path))
        assert not any("internal error" in p.message for p in outcome.problems), outcome.problems
    else:
        assert isinstance(outcome, Policy)


_FUZZ_DIR = tempfile.mkdtemp(prefix="policy-fuzz-")
# CI runs a few hundred cases (seconds); AUTOSCALER_FUZZ_EXAMPLES=20000 runs the large local fuzz.
_EXAMPLES = int(os.environ.get("AUTOSCALER_FUZZ_EXAMPLES", "300"))


@settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=hostile_policy_bytes())
def test_fuzz_validate_with_bytes_and_tags(content: bytes) -> None:
    check_policy_bytes(content, Path(_FUZZ_DIR) / "fuzz.yaml")


@settings(max_examples=max(_EXAMPLES // 3, 1), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=hostile_policy_bytes())
def test_fuzz_reload_with_bytes_and_tags(content: bytes) -> None:
    """The watcher's poll on a mutated file returns the new policy or the kept one, never raises."""
    path = Path(_FUZZ_DIR) / "watched.yaml"
    path.write_bytes(GOOD)
    watcher = PolicyWatcher(path)
    path.write_bytes(content)
    policy, event = watcher.poll()
    assert event in ("reloaded", "invalid", None)
    if event == "invalid":
        assert policy is watcher.policy
        _located(watcher.last_errors, str(path))
