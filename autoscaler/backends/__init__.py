"""Scaling backends: Compose containers and Swarm services, behind one narrow protocol."""

from autoscaler.backends.base import OWNER_LABEL, Backend, BackendError, TargetStatus

__all__ = ["OWNER_LABEL", "Backend", "BackendError", "TargetStatus"]
