"""Observability: decision logs, Prometheus metrics, and the /healthz and /readyz endpoints."""

from autoscaler.observability.logs import configure_logging
from autoscaler.observability.metrics import Metrics

__all__ = ["Metrics", "configure_logging"]
