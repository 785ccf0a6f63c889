"""The `core` Django project: settings, URLs, WSGI entry point and the Celery app.

Importing the package loads the Celery app so that ``shared_task`` binds to it in every process (web,
workers, management commands).
"""

from __future__ import annotations

from core.celery import app as celery_app

__all__ = ["celery_app"]
