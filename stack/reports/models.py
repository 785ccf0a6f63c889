"""Tables: the data reports aggregate, reports, what was enqueued, and what ran (once per task id)."""

from __future__ import annotations

import uuid
from typing import ClassVar

from django.db import models
from django.utils import timezone


class Sale(models.Model):
    """One row of the data that reports aggregate (seeded by migration 0002)."""

    region = models.CharField(max_length=32)
    product = models.CharField(max_length=32)
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    quantity = models.PositiveIntegerField()
    sold_at = models.DateTimeField()

    class Meta:
        indexes: ClassVar[list[models.Index]] = [models.Index(fields=["region", "product"])]

    def __str__(self) -> str:
        return f"{self.region}/{self.product} {self.amount}"


class Report(models.Model):
    """A report request; its id is also the Celery task id of the task that renders it."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    # Work size: how many Sale rows to aggregate and how many resampling rounds to render.
    rows = models.PositiveIntegerField()
    work = models.PositiveIntegerField()
    # Label that groups enqueued work ("api" for POST /reports/, the run name for loadgen).
    run = models.CharField(max_length=64, default="api", db_index=True)
    result = models.JSONField(null=True, blank=True)
    html = models.TextField(blank=True, default="")
    error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"report {self.id} ({self.status})"


class EnqueuedTask(models.Model):
    """One task that the load generator published (written before the publish)."""

    task_id = models.CharField(max_length=64, unique=True)
    task_name = models.CharField(max_length=200)
    queue = models.CharField(max_length=64, db_index=True)
    run = models.CharField(max_length=64, db_index=True)
    enqueued_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] -> {self.queue}"


class TaskRun(models.Model):
    """What happened to one task id: exactly one row, however often the message was delivered.

    ``attempts`` counts executions that started (redeliveries and retries included), so a redelivered
    task shows up as attempts > 1 instead of as a second row. Written by reports/recording.py with
    INSERT ... ON CONFLICT (task_id) DO UPDATE.
    """

    class Status(models.TextChoices):
        STARTED = "started"
        RETRYING = "retrying"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    task_id = models.CharField(max_length=64, unique=True)
    task_name = models.CharField(max_length=200)
    queue = models.CharField(max_length=64, db_index=True)
    status = models.CharField(max_length=16, choices=Status.choices)
    attempts = models.PositiveIntegerField(default=1)
    # Deliveries that arrived after the task had already succeeded; their work was skipped.
    duplicates_skipped = models.PositiveIntegerField(default=0)
    worker_hostname = models.CharField(max_length=255)
    # Publish time stamped by autoscaler.celery (x-autoscaler-published-at), if the message had one.
    published_at = models.DateTimeField(null=True, blank=True)
    first_started_at = models.DateTimeField()
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    runtime_ms = models.FloatField(null=True, blank=True)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True, default="")

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] {self.status} x{self.attempts}"
