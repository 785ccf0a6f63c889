"""gunicorn settings, from the environment (WEB_CONCURRENCY, GUNICORN_THREADS, ...).

gthread workers: /slow (the io_intensive tasks' remote call) sleeps, and a sync worker would serve one
such request at a time. Each thread keeps at most one PostgreSQL connection (CONN_MAX_AGE), so the web
service holds at most WEB_CONCURRENCY x GUNICORN_THREADS connections (README.md, max_connections).
"""

from __future__ import annotations

import os

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "20"))
keepalive = 5
# Recycle web workers too (same leak argument as worker_max_tasks_per_child), jittered so they don't all
# restart at once.
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "5000"))
max_requests_jitter = int(os.environ.get("GUNICORN_MAX_REQUESTS_JITTER", "500"))
accesslog = os.environ.get("GUNICORN_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# No shared /tmp tricks needed on Docker's default overlay; keep the heartbeat files in memory.
worker_tmp_dir = "/dev/shm"  # noqa: S108 - gunicorn's documented recommendation for containers
# gunicorn 24+ opens a control socket under $HOME by default; nothing here uses it.
control_socket_disable = True
