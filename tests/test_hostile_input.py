"""Hostile input never raises out of the controller: mutated policy files, settings, stored state, metrics.

Every refusal of a policy is located (`FILE:LINE: field: message`), a mutated policy that is accepted decides
without raising whatever the metrics are, a stored pool state that is malformed, non-finite or from the
future is refused or clamped, and a non-finite metric is "unknown", never a number to act on.
(Trust boundaries I, defects 5, 6 and 9.)
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoscaler.backends.start_backoff import StartBackoff
from autoscaler.policy.decide import decide
from autoscaler.policy.load import PolicyError, parse_policy
from autoscaler.policy.model import MAX_REPLICAS, Policy
from autoscaler.settings import SettingsError, load_settings
from autoscaler.sources.celery_redis import _latency
from autoscaler.state_store import RedisStateStore
from autoscaler.types import MAX_BACKOFF, Observation, PoolState, QueueStats, StartBackoffState

ROOT = Path(__file__).resolve().parent.parent
SEEDS = [
    ROOT / "policies" / "default.yaml",
    ROOT / "policies" / "swarm.yaml",
    ROOT / "tests" / "e2e" / "policy.yaml",
    *sorted((ROOT / "tests" / "fixtures" / "policies" / "valid").glob("*.yaml")),
]
SOURCE = "policy.yaml"
LOCATED = re.compile(rf"^{re.escape(SOURCE)}:\d+: \S.*$")
# What a careless or hostile edit puts in a value's place.
TOKENS = [
    "!!int 15s", "!!float x", "null", "~", ".inf", "-.inf", ".nan", "1e400", "-1e400", "1e-320", "1e300", "0.0001",
    "-1", "0", "[]", "{}", "[1, 2]", "{a: 1}", "''", "'15s'", "true", "&a x", "*a", "!!binary aGk=", "2**64",
    "18446744073709551616", "1_000", "0x10", "15 s", "1h30m", "-5m", "\t", "? x", "|\n  x", "\"\\x00\"",
]


def _mutate(text: str, data: st.DataObject) -> str:
    lines = text.splitlines()
    for _ in range(data.draw(st.integers(1, 3))):
        if not lines:
            break
        i = data.draw(st.integers(0, len(lines) - 1))
        kind = data.draw(st.sampled_from(["value", "delete", "duplicate", "indent", "key", "chars"]))
        line = lines[i]
        if kind == "value" and ":" in line:
            key, _, _ = line.partition(":")
            lines[i] = f"{key}: {data.draw(st.sampled_from(TOKENS))}"
        elif kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, line)
        elif kind == "indent":
            lines[i] = data.draw(st.sampled_from(["", "  ", "    ", "\t"])) + line.lstrip()
        elif kind == "key" and ":" in line:
            indent = line[: len(line) - len(line.lstrip())]
            key = data.draw(st.sampled_from(["null", "~", "1", "[x]", "''", "pools", "min", "? "]))
            lines[i] = f"{indent}{key}:{line.partition(':')[2]}"
        else:
            at = data.draw(st.integers(0, len(line)))
            lines[i] = line[:at] + data.draw(st.text(max_size=4)) + line[at:]
    return "\n".join(lines) + "\n"


def _parse(text: str) -> tuple[Policy | None, list[str]]:
    try:
        return parse_policy(text, source=SOURCE), []
    except PolicyError as exc:
        return None, [str(p) for p in exc.problems]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(SEEDS), data=st.data())
def test_a_mutated_policy_is_accepted_or_refused_with_located_problems_never_raises(
    seed: Path, data: st.DataObject
) -> None:
    text = _mutate(seed.read_text(), data)
    policy, problems = _parse(text)
    if policy is None:
        assert problems, text
        for problem in problems:
            assert LOCATED.match(problem), f"not located: {problem}\n--- policy:\n{text}"
        return
    # Accepted: every pool decides without raising, whatever the queues hold.
    waiting = data.draw(st.integers(0, 10**15))
    latency = data.draw(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)))
    current = data.draw(st.one_of(st.none(), st.integers(0, 2 * MAX_REPLICAS)))
    for pool in policy.pools:
        observation = Observation(
            queues=tuple(QueueStats(q, waiting=waiting, unacked=waiting, latency_s=latency) for q in pool.queues),
            current=current,
        )
        decision = decide(pool, observation, PoolState(), 1_000_000.0)
        assert decision.desired is None or 0 <= decision.desired <= MAX_REPLICAS


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        pytest.param("interval: !!int 15s", "", id="int-tag-on-a-duration"),
        pytest.param("interval: 1e300", "interval", id="interval-1e300"),
        pytest.param("interval: 0.0001", "interval", id="interval-0.0001"),
    ],
)
def test_the_policies_the_issue_names_are_refused_with_their_line(edit: str, field: str) -> None:
    text = (ROOT / "policies" / "default.yaml").read_text()
    text = re.sub(r"(?m)^interval: .*$", edit, text)
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, source=SOURCE)
    assert all(LOCATED.match(str(p)) for p in caught.value.problems), caught.value.problems
    assert any(p.path == field for p in caught.value.problems) or not field, caught.value.problems


@pytest.mark.parametrize(
    ("fragment", "path"),
    [
        pytest.param("per_replica: {value: 1e-320}", "pools.fast.per_replica.value", id="value-1e-320"),
        pytest.param("per_replica: {value: .inf}", "pools.fast.per_replica.value", id="value-inf"),
        pytest.param("tiers: [{above: .inf, replicas: 10}]", "pools.fast.tiers[0].above", id="above-inf"),
        pytest.param("tiers: [{above: .nan, replicas: 10}]", "pools.fast.tiers[0].above", id="above-nan"),
    ],
)
def test_non_finite_or_tiny_policy_numbers_are_refused_where_they_are(fragment: str, path: str) -> None:
    text = f"""interval: 15s
pools:
  fast:
    target: {{compose: {{service: w}}}}
    queues: [fast]
    min: 0
    max: 10
    {fragment}
"""
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, source=SOURCE)
    assert [p.path for p in caught.value.problems] == [path], caught.value.problems
    assert caught.value.problems[0].line == 8


def test_a_null_pool_key_with_a_field_error_is_reported_not_raised() -> None:
    """A null pool name plus a field error raised TypeError in the path formatting."""
    text = "pools:\n  ~:\n    target: {compose: {service: w}}\n    queues: [q]\n    min: x\n    max: 1\n"
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, source=SOURCE)
    assert all(LOCATED.match(str(p)) for p in caught.value.problems), caught.value.problems


# -- metrics ----------------------------------------------------------------------------------------------

POOL_TEXT = """pools:
  fast:
    target: {compose: {service: w}}
    queues: [fast]
    min: 1
    max: 10
    metric: %s
    %s
"""


@pytest.mark.parametrize("latency", [math.inf, -math.inf, math.nan])
def test_a_non_finite_latency_is_unknown_and_the_pool_holds(latency: float) -> None:
    pool = parse_policy(POOL_TEXT % ("latency", "per_replica: {value: 5}"), source=SOURCE).pools[0]
    decision = decide(pool, Observation((QueueStats("fast", 3, 0, latency),), current=2), PoolState(), 1e6)
    assert decision.desired == 2 and "not a finite" in decision.reason, decision.reason


def test_a_publish_stamp_of_minus_1e400_reads_as_unknown_latency() -> None:
    for stamp in (b"-1e400", b"1e400", b"nan", b"inf", b"-inf", b"x"):
        assert _latency(5, stamp, 1_000_000.0) is None, stamp
    assert _latency(5, b"999990.0", 1_000_000.0) == 10.0


# -- stored state -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        '{"recommendations": [[0, 1e400]]}',
        '{"recommendations": [[1e400, 3]]}',
        '{"last_scale_up": 1e400}',
        '{"last_scale_down": NaN}',
        '{"last_scale_up": -Infinity}',
        '{"consecutive_failures": 1e400}',
        '{"recommendations": [[0, -1]]}',
        '{"recommendations": {"a": 1}}',
        '{"recommendations": [[0]]}',
        '{"last_scale_up": true}',
        '{"last_scale_up": "now"}',
        '{"draining": [["../../etc/passwd", 1]]}',
        '{"draining": [["abc", 1]]}',
        '{"draining": [["0123456789ab", 1e400]]}',
        '{"draining": "0123456789ab"}',
        "[]",
    ],
)
def test_a_poisoned_state_record_is_refused_as_malformed(record: str) -> None:
    with pytest.raises(ValueError, match=r"."):  # the store then starts that pool fresh, and says so
        PoolState.from_json(record)


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["last_scale_up", "last_scale_down", "recommendations", "consecutive_failures",
                         "last_scale_up_to", "x"]),
        inner, max_size=4),
    max_leaves=12,
))
@settings(max_examples=500, deadline=None)
def test_any_json_as_a_state_record_parses_or_is_refused_with_value_error(value: object) -> None:
    try:
        text = json.dumps(value)
    except ValueError:
        return
    try:
        state = PoolState.from_json(text)
    except ValueError:
        return
    # Accepted: usable by decide at any time.
    pool = parse_policy(POOL_TEXT % ("waiting", "tiers: [{above: 5, replicas: 10}]"), source=SOURCE).pools[0]
    decide(pool, Observation((QueueStats("fast", 7, 0, 0.0),), current=2), state, 1e6)


@pytest.mark.parametrize("value", ["-1", "true", "1e9", "2.5", '"5"', "[5]", "10000000"])
def test_a_poisoned_last_scale_up_count_is_refused_naming_its_field(value: str) -> None:
    """The count the last scale-up reached decides whether a higher reading may act within the up-cooldown: a
    forged one is refused, naming the field (the store then starts that pool fresh, and says so)."""
    with pytest.raises(ValueError, match="last_scale_up_to"):
        PoolState.from_json('{"last_scale_up": 5, "last_scale_up_to": ' + value + '}')


def test_the_last_scale_up_count_survives_the_round_trip() -> None:
    state = PoolState(last_scale_up=5.0, last_scale_up_to=7)
    assert PoolState.from_json(state.to_json()) == state


def test_a_state_from_the_future_does_not_freeze_the_cooldowns() -> None:
    """A last action stamped a day ahead (clock skew between managers, or a forged record) counts as now."""
    pool = parse_policy(POOL_TEXT % ("waiting", "tiers: [{above: 5, replicas: 10}]\n    cooldown: {up: 30s}"),
                        source=SOURCE).pools[0]
    now = 1_000_000.0
    state = PoolState(last_scale_up=now + 86400, last_scale_down=now + 86400, recommendations=((now + 86400, 2),))
    held = decide(pool, Observation((QueueStats("fast", 50, 0, 0.0),), current=2), state, now)
    assert held.desired == 2 and "up-cooldown" in held.reason
    later = decide(pool, Observation((QueueStats("fast", 50, 0, 0.0),), current=2), held.state, now + 31)
    assert later.desired == 10, later.reason


# -- settings ---------------------------------------------------------------------------------------------

SETTINGS_VARS = ["REDIS_URL", "STATE_REDIS_URL", "DRY_RUN", "INTERVAL", "LEADER_TTL", "METRICS_PORT", "LOG_FORMAT",
                 "BUSY_PROBE_TIMEOUT", "STATE_PREFIX"]


@given(st.dictionaries(
    st.sampled_from(SETTINGS_VARS),
    st.one_of(
        st.sampled_from(["", " ", "true", "yes", "0", "-1", "1e400", "nan", "inf", "redis://x:1/0", "localhost:6379",
                         "unix:///tmp/r.sock", "json", "99999", "x" * 300]),
        st.text(max_size=10),
    ),
    max_size=4,
))
@settings(max_examples=400, deadline=None)
def test_any_environment_gives_settings_or_errors_naming_the_variable(env: dict[str, str]) -> None:
    saved = {k: v for k, v in os.environ.items() if k.startswith("AUTOSCALER_")}
    try:
        for key in saved:
            del os.environ[key]
        os.environ.update({f"AUTOSCALER_{k}": v.replace("\x00", "") for k, v in env.items()})
        problems = _settings_problems()
        assert all(p.startswith("AUTOSCALER_") and "=" in p for p in problems), problems
    finally:
        for key in [k for k in os.environ if k.startswith("AUTOSCALER_")]:
            del os.environ[key]
        os.environ.update(saved)


def _settings_problems() -> list[str]:
    try:
        load_settings()
    except SettingsError as exc:
        return exc.problems or ["(an error with no problem listed)"]
    return []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param({"AUTOSCALER_REDIS_URL": "localhost:6379"}, "AUTOSCALER_REDIS_URL='localhost:6379': must start",
                     id="redis-url-without-scheme"),
        pytest.param({"AUTOSCALER_DRY_RUN": "maybe"}, "AUTOSCALER_DRY_RUN='maybe'", id="dry-run-not-a-bool"),
    ],
)
def test_bad_settings_exit_2_with_the_variable_named_not_a_traceback(env: dict[str, str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "autoscaler.cli", "status"], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=ROOT, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_an_empty_dry_run_variable_means_unset() -> None:
    """`AUTOSCALER_DRY_RUN=` (what Compose's `${VAR:-}` passes) used to stop the process with a traceback."""
    saved = os.environ.get("AUTOSCALER_DRY_RUN")
    os.environ["AUTOSCALER_DRY_RUN"] = ""
    try:
        assert load_settings().dry_run is None
    finally:
        if saved is None:
            del os.environ["AUTOSCALER_DRY_RUN"]
        else:
            os.environ["AUTOSCALER_DRY_RUN"] = saved


def test_draining_marks_survive_the_round_trip_through_redis() -> None:
    state = PoolState(last_scale_down=5.0, draining=(("0123456789ab" * 5 + "0123", 100.0),))
    assert PoolState.from_json(state.to_json()) == state


# -- the start back-off in the stored state (issue 17, item 7) -----------------------------------------------------

CID = "0123456789ab" * 5 + "0123"


@pytest.mark.parametrize(
    ("backoff", "field"),
    [
        ('{"until": 1e400}', "backoff.until"),
        ('{"until": -1}', "backoff.until"),
        ('{"until": "soon"}', "backoff.until"),
        ('{"failed_rounds": -1}', "backoff.failed_rounds"),
        ('{"failed_rounds": 1e9}', "backoff.failed_rounds"),
        ('{"failed_rounds": 1000000000}', "backoff.failed_rounds"),
        ('{"failed_rounds": true}', "backoff.failed_rounds"),
        ('{"why": "\\u001b[2J\\u001b[31mfake"}', "backoff.why"),
        ('{"why": "line\\nbreak"}', "backoff.why"),
        (json.dumps({"why": "x" * 301}), "backoff.why"),
        ('{"why": 5}', "backoff.why"),
        ('{"round_ids": ["../../etc/passwd"], "round_created": 1}', "backoff.round_ids"),
        (json.dumps({"round_ids": CID, "round_created": 1}), "backoff.round_ids"),
        (json.dumps({"round_ids": [CID]}), "backoff.round_created"),
        (json.dumps({"round_ids": [CID], "round_created": math.nan}), "backoff.round_created"),
        ("[]", "backoff"),
        ('"x"', "backoff"),
    ],
)
def test_a_poisoned_start_back_off_is_refused_naming_its_field(backoff: str, field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(field)):
        PoolState.from_json(f'{{"target": 3, "backoff": {backoff}}}')


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5) | st.sampled_from([CID, "a" * 25, "\x1b[31m", 1e15, 2**31, 599.5]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["failed_rounds", "until", "why", "round_ids", "round_created", "x"]), inner, max_size=5),
    max_leaves=12,
))
@settings(max_examples=500, deadline=None)
def test_any_json_as_a_start_back_off_parses_or_is_refused_and_never_breaks_a_tick(value: object) -> None:
    try:
        text = json.dumps({"backoff": value})
    except ValueError:
        return
    refusal = ""
    try:
        state = PoolState.from_json(text)
    except ValueError as exc:
        refusal = str(exc)
    if refusal:
        assert "backoff" in refusal  # located: the field in the pool's record (the store names the pool)
        return
    now = 1e6
    pool = parse_policy(POOL_TEXT % ("waiting", "tiers: [{above: 5, replicas: 10}]"), source=SOURCE).pools[0]
    decision = decide(pool, Observation((QueueStats("fast", 7, 0, 0.0),), current=2), state, now)
    if decision.desired == 2:  # held by the back-off: for no longer than the longest one there is
        assert state.backoff.until is not None and "backing off" in decision.reason
        assert decide(pool, Observation((QueueStats("fast", 7, 0, 0.0),), current=2), decision.state,
                      now + MAX_BACKOFF).desired == 10
    backoff = StartBackoff()
    backoff.restore("fast", state.backoff, now)
    backoff.observe("fast", {CID: "exited"}, now + 1)
    backoff.blocked("fast", now + 1)
    assert PoolState.from_json(replace(state, backoff=backoff.snapshot("fast")).to_json()).backoff == \
        backoff.snapshot("fast")


def test_a_start_back_off_from_the_future_holds_no_longer_than_the_longest_back_off() -> None:
    pool = parse_policy(POOL_TEXT % ("waiting", "tiers: [{above: 5, replicas: 10}]"), source=SOURCE).pools[0]
    now = 1_000_000.0
    state = PoolState(backoff=StartBackoffState(failed_rounds=3, until=now + 86400 * 365, why="forged"))
    held = decide(pool, Observation((QueueStats("fast", 50, 0, 0.0),), current=2), state, now)
    assert held.desired == 2 and "next try in 10m" in held.reason
    later = decide(pool, Observation((QueueStats("fast", 50, 0, 0.0),), current=2), held.state, now + MAX_BACKOFF)
    assert later.desired == 10, later.reason


@pytest.mark.redis
def test_a_poisoned_back_off_starts_only_its_own_pool_fresh(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    good = PoolState(target=4, backoff=StartBackoffState(failed_rounds=1, until=50.0, why="1 of 1 exited",
                                                         round_ids=(CID,), round_created=20.0))
    client.set("autoscaler:state:fast", good.to_json())
    client.set("autoscaler:state:io", '{"target": 4, "backoff": {"why": "\\u001b[31m"}}')
    states = RedisStateStore(client).load(["fast", "io"])
    assert states == {"fast": good, "io": PoolState()}
    client.close()
