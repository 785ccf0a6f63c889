"""Why a Compose replica stopped: an OOM kill that Docker did not flag is still called one.

Docker sets `State.OOMKilled` only when containerd's OOM event reaches it before the exit event; on a busy
host the exit can win (a CI run saw the 32 MiB `hog` of test_compose_backend exit 137 with OOMKilled false).
These tests give `ReplicaHealth` the daemon's answers as data; tests/docker/test_compose_backend.py runs
the same path against the real engine.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from autoscaler.backends.base import BackendError
from autoscaler.backends.compose_health import ReplicaHealth
from autoscaler.backends.compose_model import Replica
from autoscaler.backends.docker_client import docker_time
from autoscaler.backends.start_backoff import StartBackoff
from autoscaler.policy.model import PoolPolicy

STARTED = "2026-12-01T19:06:06.123456789Z"
STARTED_EPOCH = dt.datetime(2026, 12, 1, 19, 6, 6, 123456, tzinfo=dt.UTC).timestamp()


def pool() -> PoolPolicy:
    return PoolPolicy.model_validate({"name": "hog", "target": {"compose": {"service": "hog"}}, "queues": ["q"],
                                      "min": 1, "max": 4, "tiers": [{"above": 100, "replicas": 4}]})


def exited(code: int) -> Replica:
    return Replica.from_summary({"Id": "c" * 64, "Names": ["/proj_hog_1"], "State": "exited",
                                 "Status": f"Exited ({code}) 1 second ago", "Created": 0, "Labels": {}})


def inspected(code: int, *, oom_flag: bool = False, memory: int = 32 << 20) -> dict[str, Any]:
    return {"State": {"ExitCode": code, "OOMKilled": oom_flag, "StartedAt": STARTED},
            "HostConfig": {"Memory": memory}, "Created": STARTED}


class Daemon:
    """The two answers the diagnosis reads: the container's inspect, and its logged "oom" events."""

    def __init__(self, info: dict[str, Any], oom_events: int | BackendError) -> None:
        self.info = info
        self.answer = oom_events
        self.asked: list[tuple[str, float]] = []

    def oom_events(self, cid: str, since: float) -> int:
        self.asked.append((cid, since))
        if isinstance(self.answer, BackendError):
            raise self.answer
        return self.answer

    def health(self, reported: list[tuple[str, str]]) -> ReplicaHealth:
        return ReplicaHealth(
            inspect=lambda _cid: self.info, discard=lambda _cid, _name: None, oom_events=self.oom_events,
            on_failure=lambda name, why: reported.append((name, why)), backoff=StartBackoff(),
            created_grace=60, read_only=False, clock=lambda: STARTED_EPOCH + 5,
        )


def diagnose(daemon: Daemon, code: int) -> tuple[Any, list[tuple[str, str]]]:
    reported: list[tuple[str, str]] = []
    problems = daemon.health(reported).note_problems(pool(), [exited(code)], draining=())
    return problems, reported


def test_a_sigkill_under_a_memory_limit_with_a_logged_oom_event_is_an_oom_kill() -> None:
    daemon = Daemon(inspected(137), oom_events=1)
    problems, reported = diagnose(daemon, 137)
    assert (problems.oom_killed, problems.exited) == (1, 0)
    assert reported == [("hog", "oom-killed")]
    assert daemon.asked == [("c" * 64, STARTED_EPOCH - 1)]


def test_a_sigkill_with_no_oom_event_is_an_exit_with_an_error() -> None:
    problems, reported = diagnose(Daemon(inspected(137), oom_events=0), 137)
    assert (problems.oom_killed, problems.exited) == (0, 1)
    assert reported == [("hog", "exited")]


def test_the_flag_alone_suffices_and_other_exits_never_ask_the_event_log() -> None:
    flagged = Daemon(inspected(137, oom_flag=True), oom_events=0)
    assert diagnose(flagged, 137)[0].oom_killed == 1 and flagged.asked == []
    for code in (1, 3, 143):
        daemon = Daemon(inspected(code), oom_events=1)
        assert diagnose(daemon, code)[0].exited == 1 and daemon.asked == []
    unlimited = Daemon(inspected(137, memory=0), oom_events=1)
    assert diagnose(unlimited, 137)[0].exited == 1 and unlimited.asked == []


def test_an_event_log_that_cannot_be_read_leaves_an_exit_with_an_error() -> None:
    problems, reported = diagnose(Daemon(inspected(137), oom_events=BackendError("socket proxy: refused")), 137)
    assert (problems.oom_killed, problems.exited) == (0, 1)
    assert reported == [("hog", "exited")]


def test_the_diagnosis_is_made_once_per_replica() -> None:
    daemon = Daemon(inspected(137), oom_events=1)
    reported: list[tuple[str, str]] = []
    health = daemon.health(reported)
    for _ in range(3):
        assert health.note_problems(pool(), [exited(137)], draining=()).oom_killed == 1
    assert reported == [("hog", "oom-killed")] and len(daemon.asked) == 1


def test_docker_times_read_as_epoch_seconds() -> None:
    assert docker_time(STARTED, default=0) == STARTED_EPOCH
    assert docker_time("2026-12-01T19:06:06Z", default=0) == int(STARTED_EPOCH)
    assert docker_time("", default=7.0) == 7.0 and docker_time(None, default=7.0) == 7.0


@given(st.one_of(st.text(max_size=40), st.integers(), st.none(), st.floats(allow_nan=True)))
def test_any_time_field_reads_as_a_number_or_the_default(value: object) -> None:
    assert isinstance(docker_time(value, default=-1.0), float)


@given(st.fixed_dictionaries({}, optional={
    "State": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
        "ExitCode": st.one_of(st.integers(), st.none(), st.text(max_size=5)),
        "OOMKilled": st.one_of(st.booleans(), st.none(), st.text(max_size=5)),
        "StartedAt": st.one_of(st.text(max_size=40), st.none(), st.integers()),
    })),
    "HostConfig": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
        "Memory": st.one_of(st.integers(), st.none(), st.text(max_size=5)),
    })),
    "Created": st.one_of(st.text(max_size=40), st.none(), st.integers()),
}))
def test_any_inspect_answer_gives_a_diagnosis_never_an_exception(info: dict[str, Any]) -> None:
    problems, reported = diagnose(Daemon(info, oom_events=1), 137)
    assert problems.oom_killed + problems.exited <= 1
    assert all(why in ("exited", "oom-killed") for _, why in reported)
