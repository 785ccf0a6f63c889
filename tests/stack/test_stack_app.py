"""The stack's Django app: endpoints, exactly-once recording, accounting, guards (eager Celery, SQLite)."""

from __future__ import annotations

import json
import time
import uuid

import pytest

pytest.importorskip("django", reason="the stack's requirements (requirements/stack.lock) are not installed")

from core.settings import database_from_url
from core.startup import refuse_eager_outside_tests
from django.core import mail
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client, override_settings
from hypothesis import given, settings
from hypothesis import strategies as st
from reports.accounting import account
from reports.checks import check_task_routes
from reports.models import EnqueuedTask, Report, TaskRun
from reports.recording import record_start
from reports.tasks import MAX_LATENCY_MS, _clamped_latency_ms, fetch_slow, generate_report, send_notification


def test_post_report_answers_202_with_id_and_the_task_records_the_result(db):
    """POST /reports/ answers 202 with an id; the task (eager here) fills the report and one TaskRun."""
    client = Client()
    response = client.post("/reports/", data=json.dumps({"rows": 200, "work": 5}), content_type="application/json")
    assert response.status_code == 202
    report_id = response.json()["id"]
    detail = client.get(f"/reports/{report_id}/").json()
    assert detail["status"] == "done"
    assert detail["result"]["rows"] == 200
    assert detail["result"]["groups"] > 0
    assert detail["attempts"] == 1
    run = TaskRun.objects.get(task_id=report_id)
    assert (run.queue, run.status, run.attempts) == ("cpu_intensive", "succeeded", 1)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param("[1]", id="not-an-object"),
        pytest.param('{"rows": -1}', id="negative"),
        pytest.param('{"work": "x"}', id="not-an-int"),
        pytest.param("{", id="bad-json"),
    ],
)
def test_post_report_rejects_bad_input(db, body):
    """Invalid bodies get 400 and enqueue nothing."""
    response = Client().post("/reports/", data=body, content_type="application/json")
    assert response.status_code == 400
    assert not Report.objects.exists()


def test_post_report_answers_503_and_keeps_no_row_when_the_broker_is_down(db, monkeypatch):
    """A failed publish answers 503 and deletes the row, so nothing counts as enqueued."""

    def refuse(*args, **kwargs):
        raise ConnectionError("broker down")

    monkeypatch.setattr(generate_report, "apply_async", refuse)
    response = Client().post("/reports/", data="{}", content_type="application/json")
    assert response.status_code == 503
    assert not Report.objects.exists()


@pytest.mark.redis
def test_post_report_answers_503_before_the_broker_fills(db, redis_url, monkeypatch):
    """Above 80 % of the broker's maxmemory POST /reports/ is refused at the door (a real Redis's INFO)."""
    import redis  # noqa: PLC0415 - only this test talks to a real Redis
    from reports import publishing  # noqa: PLC0415

    broker = redis.Redis.from_url(redis_url)
    used = int(broker.info("memory")["used_memory"])
    monkeypatch.setattr(publishing, "broker", lambda: broker)
    publishing.publish_guard.cache_clear()
    try:
        with override_settings(CELERY_BROKER_URL=redis_url):
            broker.config_set("maxmemory", int(used * 1.1))
            refused = Client().post("/reports/", data="{}", content_type="application/json")
            assert refused.status_code == 503
            assert "nearly full" in refused.json()["error"] and refused["Retry-After"] == "5"
            assert not Report.objects.exists()
            broker.config_set("maxmemory", used * 10)
            time.sleep(1.1)  # the guard's answer is kept for a second
            assert Client().post("/reports/", data="{}", content_type="application/json").status_code == 202
    finally:
        broker.config_set("maxmemory", 0)
        broker.close()
        publishing.publish_guard.cache_clear()


def test_unknown_report_is_404(db):
    """GET on an id that does not exist answers 404."""
    assert Client().get(f"/reports/{uuid.uuid4()}/").status_code == 404


def test_redelivered_notification_keeps_one_row_counts_the_attempt_and_sends_one_mail(db):
    """A second delivery of the same task id adds an attempt, not a row, and skips the finished work."""
    kwargs = {"to": "a@example.invalid", "subject": "s", "body": "b"}
    send_notification.apply(kwargs=kwargs, task_id="task-1")
    send_notification.apply(kwargs=kwargs, task_id="task-1")
    run = TaskRun.objects.get(task_id="task-1")
    assert (run.status, run.attempts, run.duplicates_skipped, run.queue) == ("succeeded", 2, 1, "fast")
    assert TaskRun.objects.count() == 1
    assert len(mail.outbox) == 1


def test_failed_io_task_is_retried_then_recorded_failed(db, monkeypatch):
    """fetch_slow against a refused port retries (same id, attempts grow) and ends failed."""
    monkeypatch.setitem(fetch_slow.app.conf, "task_eager_propagates", False)  # follow the eager retries
    result = fetch_slow.apply(kwargs={"ms": 1, "timeout_s": 0.5}, task_id="io-1")
    assert result.failed()
    run = TaskRun.objects.get(task_id="io-1")
    assert run.status == "failed"
    assert run.attempts == 1 + fetch_slow.max_retries
    assert run.queue == "io_intensive"


def test_report_task_failure_marks_the_report_failed(db, monkeypatch):
    """An exception inside the rendering marks both the report and its TaskRun failed."""

    def broken(report):
        raise RuntimeError("renderer broke")

    monkeypatch.setattr("reports.tasks._render_report", broken)
    report = Report.objects.create(rows=10, work=1)
    with pytest.raises(RuntimeError, match="renderer broke"):
        generate_report.apply(args=[str(report.pk)], task_id=str(report.pk), throw=True)
    report.refresh_from_db()
    assert report.status == "failed"
    assert "renderer broke" in report.error
    assert TaskRun.objects.get(task_id=str(report.pk)).status == "failed"


def test_loadgen_then_taskreport_agree(db, tmp_path):
    """loadgen records ids before publishing; taskreport finds all of them completed."""
    ids_file = tmp_path / "ids.tsv"
    call_command("loadgen", queue="fast", count=5, run="unit-fast", ids_file=ids_file)
    call_command("loadgen", queue="cpu", count=2, run="unit-cpu", rows=50, work=1)
    assert EnqueuedTask.objects.filter(run="unit-fast").count() == 5
    assert len(ids_file.read_text().splitlines()) == 5
    assert account(run="unit-fast").ok
    cpu = account(run="unit-cpu")
    assert cpu.ok
    assert cpu.queues["cpu_intensive"].enqueued == 2, "Report and EnqueuedTask rows of one id count once"
    call_command("taskreport", run="unit-fast", json=True)


def test_taskreport_exits_1_when_tasks_are_missing(db):
    """An enqueued id without a successful TaskRun is missing: exit status 1."""
    EnqueuedTask.objects.create(
        task_id="lost-1", task_name="reports.tasks.send_notification", queue="fast", run="unit-lost"
    )
    with pytest.raises(CommandError) as excinfo:
        call_command("taskreport", run="unit-lost")
    assert excinfo.value.returncode == 1
    assert account(run="unit-lost").missing_ids == ["lost-1"]


def test_accounting_reports_redeliveries(db):
    """Ids with attempts > 1 are listed as redelivered; they still count as completed."""
    send_notification.apply(kwargs={"to": "a@example.invalid", "subject": "s", "body": "b"}, task_id="r-1")
    EnqueuedTask.objects.create(task_id="r-1", task_name="x", queue="fast", run="unit-redeliver")
    TaskRun.objects.filter(task_id="r-1").update(attempts=3)
    result = account(run="unit-redeliver")
    assert result.ok
    assert result.redelivered_ids == ["r-1"]
    with pytest.raises(CommandError):
        call_command("taskreport", run="unit-redeliver", fail_on_redelivery=True)


def test_tasks_summary_endpoint(db):
    """GET /tasks/summary answers per-queue counts (the broker part may report an error in tests)."""
    send_notification.apply(kwargs={"to": "a@example.invalid", "subject": "s", "body": "b"}, task_id="s-1")
    EnqueuedTask.objects.create(task_id="s-1", task_name="x", queue="fast", run="unit-summary")
    body = Client().get("/tasks/summary?run=unit-summary").json()
    assert body["queues"]["fast"]["succeeded"] == 1
    assert body["ok"] is True
    assert Client().get("/tasks/summary?queue=nope").status_code == 400


def test_slow_endpoint_bounds(db):
    """/slow sleeps the asked time and refuses values outside 0..SLOW_MAX_MS."""
    client = Client()
    assert client.get("/slow?ms=1").json() == {"slept_ms": 1}
    assert client.get("/slow?ms=-1").status_code == 400
    assert client.get("/slow?ms=abc").status_code == 400


def test_eager_mode_is_refused_outside_tests():
    """Eager Celery stops start-up unless DJANGO_TESTING is set."""
    with pytest.raises(ImproperlyConfigured):
        refuse_eager_outside_tests(always_eager=True, testing=False)
    refuse_eager_outside_tests(always_eager=True, testing=True)
    refuse_eager_outside_tests(always_eager=False, testing=False)


def test_every_task_is_routed():
    """The routing system check finds a served queue for every reports.* task."""
    assert check_task_routes() == []


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param(
            "postgres://u:p%40ss@db:5433/stack?sslmode=require",
            {
                "NAME": "stack",
                "USER": "u",
                "PASSWORD": "p@ss",
                "HOST": "db",
                "PORT": "5433",
                "OPTIONS": {"sslmode": "require"},
            },
            id="postgres",
        ),
        pytest.param("sqlite:///:memory:", {"NAME": ":memory:"}, id="sqlite-memory"),
    ],
)
def test_database_from_url(url, expected):
    """DATABASE_URL becomes a DATABASES entry."""
    parsed = database_from_url(url)
    assert {key: parsed[key] for key in expected} == expected


def test_database_from_url_rejects_unknown_scheme():
    """Only postgres and sqlite URLs are accepted."""
    with pytest.raises(ImproperlyConfigured):
        database_from_url("mysql://db/x")


@given(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
        st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    )
)
@settings(max_examples=300, deadline=None)
def test_a_messages_latency_is_clamped_never_raises(value):
    """Whatever a message carries as `latency_ms` (any JSON value), the sleep is 0..5000 ms and nothing raises."""
    assert 0 <= _clamped_latency_ms(value) <= MAX_LATENCY_MS


def test_a_notification_waits_the_latency_its_message_asks_for(db):
    """`latency_ms` in the message (loadgen --latency-ms, the demo) makes the notification take that long."""
    started = time.monotonic()
    send_notification.apply(
        kwargs={"to": "a@example.invalid", "subject": "s", "body": "b", "latency_ms": 300}, task_id="lat-1"
    )
    assert time.monotonic() - started >= 0.3
    assert TaskRun.objects.get(task_id="lat-1").status == "succeeded"


def test_a_poison_task_is_failed_for_good_after_too_many_deliveries(db, monkeypatch):
    """issue 11, 8: a task whose worker dies every time (acks_late + reject_on_worker_lost) ran forever."""
    monkeypatch.setitem(send_notification.app.conf, "task_eager_propagates", False)
    kwargs = {"to": "a@example.invalid", "subject": "s", "body": "b"}
    for _ in range(3):  # three deliveries whose worker process died before the task finished
        record_start(task_id="poison-1", task_name=send_notification.name, queue="fast", hostname="w",
                     published_at=None)
    with override_settings(CELERY_MAX_DELIVERIES=3):
        result = send_notification.apply(kwargs=kwargs, task_id="poison-1")  # the fourth
    assert result.failed() and "poison" in str(result.result)  # FAILURE, not a success with no result
    run = TaskRun.objects.get(task_id="poison-1")
    assert (run.status, run.attempts) == ("failed", 4)
    assert run.error.startswith("poison: delivered 4 times")
    assert len(mail.outbox) == 0  # not run again
    EnqueuedTask.objects.create(task_id="poison-1", task_name=send_notification.name, queue="fast")
    assert account().queues["fast"].as_dict()["poisoned"] == 1
