"""Metric sources: where queue depth, unacked counts and latency come from.

`base` holds the protocol; `celery_redis` the Celery-on-Redis implementation, imported where it is wired
(the import contract in pyproject.toml keeps the loop and the policy core from knowing it).
"""

from autoscaler.sources.base import MetricSource, SourceError

__all__ = ["MetricSource", "SourceError"]
