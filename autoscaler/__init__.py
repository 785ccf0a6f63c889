"""Queue-driven autoscaler for Celery worker pools on Docker Compose and Swarm."""

__version__ = "0.1.0"
