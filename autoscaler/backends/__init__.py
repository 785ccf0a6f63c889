"""Scaling backends: Compose containers and Swarm services, behind one narrow protocol.

`base` holds the protocol; `compose`, `swarm` and `router` the Docker implementations (imported where
they are wired, so the policy tools never load docker-py); `memory` serves the simulator and tests.
"""

from autoscaler.backends.base import OWNER_LABEL, Backend, BackendError, TargetStatus

__all__ = ["OWNER_LABEL", "Backend", "BackendError", "TargetStatus"]
