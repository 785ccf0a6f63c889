"""Metric sources: where queue depth, unacked counts and latency come from."""

from autoscaler.sources.base import MetricSource, SourceError
from autoscaler.sources.celery_redis import CeleryRedisSource

__all__ = ["CeleryRedisSource", "MetricSource", "SourceError"]
