"""Metric sources: where queue depth, unacked counts and latency come from."""

from autoscaler.sources.base import MetricSource, SourceError

__all__ = ["MetricSource", "SourceError"]
