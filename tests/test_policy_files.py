"""Policy files: golden error messages for invalid fixtures, golden decisions for valid ones, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoscaler.policy.decide import decide
from autoscaler.policy.load import PolicyError, load_policy, parse_policy
from autoscaler.policy.model import format_duration, parse_duration
from autoscaler.policy.schema import policy_json_schema
from autoscaler.types import Observation, PoolState, QueueStats

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "policies"
UPDATE = os.environ.get("UPDATE_GOLDENS") == "1"
INVALID = sorted((FIXTURES / "invalid").glob("*.yaml"))
VALID = sorted((FIXTURES / "valid").glob("*.yaml"))
# Depths probed for every pool of a valid fixture, from two starting counts, on a fresh state.
PROBE_DEPTHS = (0, 5, 50, 150, 600)


def _golden(path: Path, actual: str) -> str:
    if UPDATE:
        path.write_text(actual)
    return path.read_text()


@pytest.mark.parametrize("fixture", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_policy_errors_match_golden(fixture: Path) -> None:
    """Every problem of an invalid policy is reported at once, with its line and field, as in the golden file."""
    with pytest.raises(PolicyError) as info:
        load_policy(fixture.relative_to(ROOT))
    actual = "\n".join(str(p) for p in info.value.problems) + "\n"
    assert actual == _golden(fixture.with_suffix(".errors"), actual)


@pytest.mark.parametrize("fixture", VALID, ids=[p.stem for p in VALID])
def test_valid_policy_decisions_match_golden(fixture: Path) -> None:
    """A valid policy loads, and its decisions for a grid of depths match the golden file."""
    policy = load_policy(fixture)
    rows = []
    for pool in policy.pools:
        for current in (pool.min, pool.max):
            for depth in PROBE_DEPTHS:
                queues = tuple(QueueStats(q, depth, depth // 10, float(depth) / 10) for q in pool.queues)
                d = decide(pool, Observation(queues, current), PoolState(), now=0.0)
                rows.append(
                    {"pool": pool.name, "current": current, "depth": depth, "desired": d.desired, "reason": d.reason}
                )
        # Within the up-cooldown of a scale-up to the middle tier's count (5 at 269 waiting): a higher reading
        # acts at once, one that asks no more waits.
        up_to = min(pool.min + 3, pool.max)
        just_scaled = PoolState(last_scale_up=-1.0, last_scale_up_to=up_to)
        for depth in PROBE_DEPTHS:
            queues = tuple(QueueStats(q, depth, depth // 10, float(depth) / 10) for q in pool.queues)
            d = decide(pool, Observation(queues, up_to), just_scaled, now=0.0)
            rows.append({"pool": pool.name, "current": up_to, "depth": depth, "state": "1s after a scale-up to it",
                         "desired": d.desired, "reason": d.reason})
    actual = "\n".join(json.dumps(r) for r in rows) + "\n"
    assert actual == _golden(fixture.with_suffix(".decisions.jsonl"), actual)


def test_shipped_policies_are_valid() -> None:
    """Every policy file under policies/ validates."""
    files = sorted((ROOT / "policies").glob("*.yaml"))
    assert files
    for path in files:
        load_policy(path)


def test_default_policy_is_the_seed_rule() -> None:
    """policies/default.yaml expresses the seed's tiers for pools fast, cpu and io on the seed's queues."""
    policy = load_policy(ROOT / "policies" / "default.yaml")
    assert [(p.name, p.queues) for p in policy.pools] == [
        ("fast", ["fast"]),
        ("cpu", ["cpu_intensive"]),
        ("io", ["io_intensive"]),
    ]
    for pool in policy.pools:
        assert pool.tiers is not None
        assert [(t.above, t.below, t.replicas) for t in pool.tiers] == [(500, None, 10), (100, None, 5), (None, 10, 2)]


def test_committed_schema_is_current() -> None:
    """policies/policy.schema.json is what `autoscaler schema` prints (regenerate it when the model changes)."""
    committed = json.loads((ROOT / "policies" / "policy.schema.json").read_text())
    assert committed == policy_json_schema()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), (45, 45), ("1d", 86400)],
)
def test_durations_parse(text: str | int, seconds: float) -> None:
    """Durations are written like 30s, 5m, 1h30m or plain seconds."""
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(parse_duration(text))) == seconds


@pytest.mark.parametrize("text", ["5x", "m5", "", "-3s", "1.2.3s", True])
def test_bad_durations_are_rejected(text: object) -> None:
    """A malformed duration is an error, never a silent zero."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_unknown_key_names_line_and_path() -> None:
    """A misspelt key is rejected with its line and dotted path."""
    text = (
        "pools:\n  fast:\n    target: {compose: {service: w}}\n    queues: [fast]\n    min: 1\n"
        "    max: 2\n    per_replica: {value: 5}\n    cooldwn: {up: 1s}\n"
    )
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source="p.yaml")
    assert [str(p) for p in info.value.problems] == [
        "p.yaml:8: pools.fast.cooldwn: unknown key (check the spelling; `autoscaler schema` lists every key)"
    ]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autoscaler.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_cli_validate_exit_codes() -> None:
    """`autoscaler validate` exits 0 for good files and 1, with every message on stderr, for bad ones."""
    good = _cli("validate", "policies/default.yaml")
    assert (good.returncode, "ok (3 pools" in good.stdout) == (0, True)
    bad = _cli("validate", "policies/default.yaml", "tests/fixtures/policies/invalid/many_errors.yaml")
    assert bad.returncode == 1
    assert bad.stderr == (FIXTURES / "invalid" / "many_errors.errors").read_text()


def test_cli_validate_reads_a_pipe_from_standard_input() -> None:
    """`validate -` reads standard input, a pipe (`docker run -i IMAGE validate - <policy.yaml`, as
    scripts/swarm-up does: a file named /dev/stdin is a pipe there, and pipes are not read as policy files),
    bounded like a file, with problems located at `<stdin>`."""
    def validate_stdin(data: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "autoscaler.cli", "validate", "-"], input=data,
                              capture_output=True, cwd=ROOT, timeout=60, check=False)

    good = validate_stdin((ROOT / "policies" / "default.yaml").read_bytes())
    assert good.returncode == 0, good.stderr
    bad = validate_stdin((FIXTURES / "invalid" / "many_errors.yaml").read_bytes())
    assert bad.returncode == 1
    assert bad.stderr.decode().startswith("<stdin>:")
    huge = validate_stdin(b"# padding\n" * 20_000)
    assert huge.returncode == 1 and b"larger than 128 KiB" in huge.stderr
    assert b"Traceback" not in bad.stderr + huge.stderr


def test_cli_schema_prints_json_schema() -> None:
    """`autoscaler schema` prints a JSON Schema in which pools are a mapping by name."""
    out = _cli("schema")
    schema = json.loads(out.stdout)
    assert schema["properties"]["pools"]["type"] == "object"
    assert "PoolPolicy" in schema["$defs"]


def test_cli_help_for_every_command() -> None:
    """Every command answers --help."""
    for command in ("run", "status", "validate", "schema"):
        out = _cli(command, "--help")
        assert out.returncode == 0 and "Usage:" in out.stdout, command
