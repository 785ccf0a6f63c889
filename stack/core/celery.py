"""The Celery app: settings from Django (``CELERY_*``), the publish-time stamp, worker liveness file.

Workers start with ``celery -A core worker -Q <queue> ...``; web and workers import the same module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import autoscaler.celery
from celery import Celery, bootsteps
from celery.signals import task_postrun, task_prerun, worker_init
from django.conf import settings

from core.startup import refuse_eager_outside_tests

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "core.settings")

app = Celery("core")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Stamp every published message with its publish time (header read by the autoscaler's metric source to
# measure queue latency). Installed here so that every producer -- web, loadgen, retries -- stamps.
autoscaler.celery.install()
# Workers count their finished tasks per queue and beat with their container's memory, in the broker: the
# autoscaler exports them (celery_task_*_total, celery_worker_up, autoscaler_worker_memory_bytes) for the
# alerts in deploy/prometheus/alerts.yaml. A producer that only imports this module writes nothing.
autoscaler.celery.install_worker_stats(app)


class LivenessFile(bootsteps.StartStopStep):
    """Touch a file every few seconds while the consumer is connected to the broker.

    The container healthcheck only compares the file's age with a threshold: no Python start, no broker
    round trip, unlike ``celery inspect ping`` (a full app start plus a broadcast per check per
    container). The step belongs to the consumer blueprint, so it is stopped when the broker connection
    is lost and started again after reconnecting; the timer runs on the worker's main loop, so a blocked
    main loop also lets the file go stale.
    """

    requires = frozenset({"celery.worker.consumer.connection:Connection"})

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.path = Path(settings.WORKER_LIVENESS_FILE)
        self.interval = float(settings.WORKER_LIVENESS_INTERVAL)
        self.tref: Any = None

    def start(self, parent: Any) -> None:
        self._touch()
        self.tref = parent.timer.call_repeatedly(self.interval, self._touch, priority=10)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        self.path.unlink(missing_ok=True)

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)

    def _touch(self) -> None:
        self.path.touch()


app.steps["consumer"].add(LivenessFile)


@worker_init.connect
def _refuse_eager_worker(**_: Any) -> None:
    """A worker started with eager mode on would never consume anything: refuse it."""
    refuse_eager_outside_tests(always_eager=bool(app.conf.task_always_eager))


@task_prerun.connect
@task_postrun.connect
def _recycle_db_connections(task: Any = None, **_: Any) -> None:
    """Around each task, what Django does around each request: close connections that are past
    CONN_MAX_AGE or broken, keep the rest (one per pool process or thread).

    Not in eager mode (tests): there the task runs inside the caller's transaction.
    """
    if task is not None and getattr(task.request, "is_eager", False):
        return
    from django.db import close_old_connections  # noqa: PLC0415 - not while the settings module loads

    close_old_connections()
