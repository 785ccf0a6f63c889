"""Compose drains against a scripted engine whose stops take as long as the test says (issue 17, items 1, 10b).

A busy worker's warm shutdown can take the pool's whole `stop_timeout` (ten minutes here): the engine's stop
answers only when the test finishes it, and the backend's clock is the test's, so a restart "15 s into the
drain" or "after the first stops ended at their grace" happens without waiting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoscaler.backends.base import BackendError
from autoscaler.backends.compose import ComposeBackend
from autoscaler.backends.docker_client import DockerConnection
from autoscaler.backends.docker_events import count_action
from autoscaler.policy.model import PoolPolicy
from tests.docker.dockertest import wait_until
from tests.scripted_engine import ScriptedEngine
from tests.test_loop import Clock

GRACE = 600
POOL = PoolPolicy.model_validate({
    "name": "fast", "target": {"compose": {"service": "worker", "project": "p"}}, "queues": ["fast"],
    "min": 1, "max": 40, "tiers": [{"below": 10, "replicas": 6}], "stop_timeout": "10m",
})
# Pieces of real event lines, to be cut and joined in any order with random bytes.
EVENT_PIECES = [b'{"Type": "container", "Action": "oom", "id": "c"}\n', b'{"status": "oom"}', b'{"Action":', b'"oom"}',
                b"\n", b"[", b"]", b'"', b"{", b"}", b"1e999999", b'"\\ud800"', b"[" * 50]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(clock: Clock) -> Iterator[ScriptedEngine]:
    scripted = ScriptedEngine(clock=clock)
    yield scripted
    scripted.close()


def backend_on(engine: ScriptedEngine, clock: Clock) -> ComposeBackend:
    return ComposeBackend(docker_connection=DockerConnection(base_url=engine.url), clock=clock)


def shut(backend: ComposeBackend, engine: ScriptedEngine) -> None:
    """Every worker exits; the backend's drains end (their removes answered) before it is closed."""
    engine.finish(engine.received())
    wait_until(lambda: backend.draining(POOL) == 0, timeout=30, what="the drains to end")
    backend.close()


def pending(engine: ScriptedEngine) -> set[str]:
    return {s.container for s in engine.received() if not s.done.is_set()}


def resume_after_restart(engine: ScriptedEngine, clock: Clock, predecessor: ComposeBackend) -> dict[str, int]:
    """The controller is replaced mid-drain; its successor takes the marks over: the grace of each stop it
    sends, by container."""
    marks = predecessor.drain_marks(POOL)
    before = len(engine.received())
    successor = backend_on(engine, clock)
    try:
        successor.resume_drains(POOL, marks)
        resumed = wait_until(lambda: (got := engine.received()[before:]) and len(got) >= len(marks) and got,
                             timeout=30, what="the resumed stops") if marks else []
        return {s.container: s.grace for s in resumed}
    finally:
        engine.finish(engine.received())
        shut(predecessor, engine)
        shut(successor, engine)


def test_40_scaled_to_6_with_a_10m_grace_resumes_the_full_remainder_after_a_restart(
    engine: ScriptedEngine, clock: Clock
) -> None:
    """The issue's scenario: the victims whose stop waited for a free thread were resumed with a 1 s grace."""
    engine.add_running(40)
    backend = backend_on(engine, clock)
    try:
        backend.scale(POOL, current=40, desired=6)
        wait_until(lambda: len(engine.received()) >= 32, timeout=30, what="the first stops")
        sent_at = {s.container: s.at for s in engine.received()}
        # Ten minutes on, the busy workers whose stop was sent end at their grace (SIGKILL)...
        clock.now += GRACE
        engine.finish(engine.received())
        wait_until(lambda: {cid for cid, _ in backend.drain_marks(POOL)} == pending(engine), timeout=30,
                   what="the ended drains to leave the marks")
        sent_at.update({s.container: s.at for s in engine.received() if s.container not in sent_at})
        # ...and the controller restarts 15 s later.
        clock.now += 15
    except BaseException:
        shut(backend, engine)
        raise
    resumed = resume_after_restart(engine, clock, backend)
    assert resumed == {cid: round(sent_at[cid] + GRACE - clock.now) for cid in resumed}


def test_every_victim_is_sent_its_stop_at_once_and_marked_from_then(engine: ScriptedEngine, clock: Clock) -> None:
    engine.add_running(40)
    backend = backend_on(engine, clock)
    try:
        started = clock.now
        backend.scale(POOL, current=40, desired=6)
        # No victim waits for another's stop to end (34 stops of up to ten minutes each, all under way).
        wait_until(lambda: len(engine.received()) == 34, timeout=30, what="34 stops under way at once")
        marks = backend.drain_marks(POOL)
        assert dict(marks) == {
            s.container: s.at + GRACE for s in engine.received()
        }
        assert all(s.at == started for s in engine.received())
        clock.now += 15
    except BaseException:
        shut(backend, engine)
        raise
    assert set(resume_after_restart(engine, clock, backend).values()) == {GRACE - 15}


def test_a_victim_is_marked_only_once_its_stop_is_sent(engine: ScriptedEngine, clock: Clock) -> None:
    """A stop held back (here: the lease check before it is slow) is not in the marks a save would write."""
    engine.add_running(3)
    gate = threading.Event()

    def fence(what: str) -> None:
        if what.startswith("stop container"):
            gate.wait()

    backend = ComposeBackend(docker_connection=DockerConnection(base_url=engine.url, fence=fence), clock=clock)
    try:
        backend.scale(POOL, current=3, desired=1)
        assert backend.draining(POOL) == 2  # not counted as capacity any more...
        assert backend.drain_marks(POOL) == ()  # ...but not marked: no SIGTERM has gone out yet
        clock.now += 100
        gate.set()
        wait_until(lambda: len(engine.received()) == 2, timeout=30, what="the two stops")
        assert {deadline for _, deadline in backend.drain_marks(POOL)} == {clock.now + GRACE}
    finally:
        gate.set()
        shut(backend, engine)


@pytest.mark.parametrize("chatty", [True, False], ids=["unrelated-events", "silence"])
def test_the_oom_event_query_ends_when_the_daemon_never_ends_the_stream(
    engine: ScriptedEngine, clock: Clock, chatty: bool
) -> None:
    engine.events_chatty = chatty
    backend = backend_on(engine, clock)
    outcome: list[object] = []

    def query() -> None:
        try:
            outcome.append(backend._oom_events("c" * 64, since=clock.now - 60))
        except BackendError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=query, daemon=True)
    worker.start()
    worker.join(timeout=60)
    backend.close()
    assert outcome, "the oom event query never returned"
    assert isinstance(outcome[0], BackendError), outcome
    assert "oom events" in str(outcome[0]) and "did not end" in str(outcome[0]), outcome
    assert engine.events_requests == 1  # not retried: one unanswered query is answer enough


@given(chunks=st.lists(st.binary(max_size=200) | st.sampled_from(EVENT_PIECES), max_size=20))
def test_any_event_stream_gives_a_count_or_a_located_refusal(chunks: list[bytes]) -> None:
    outcome: int | BackendError
    try:
        outcome = count_action(chunks, action="oom", deadline=time.monotonic() + 60)
    except BackendError as exc:
        outcome = exc
    if isinstance(outcome, BackendError):
        assert "oom events stream" in str(outcome) and "bytes" in str(outcome), outcome
    else:
        assert 0 <= outcome <= len(b"".join(chunks))


def test_an_event_stream_counts_only_the_action_asked_for() -> None:
    stream = [b'{"Action": "oom", "id": "a"}\n{"Action": "die"', b', "id": "a"}\n{"status": "oom"}\n[1]\n']
    assert count_action(stream, action="oom", deadline=time.monotonic() + 60) == 2
