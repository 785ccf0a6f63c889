"""Django and Celery settings, read from environment variables only.

Web and worker containers get the SAME environment (one YAML anchor in compose.yaml): the seed's
"Task Import Failures" came from settings that differed between containers. Every Celery setting lives
here under the ``CELERY_`` prefix; ``core/celery.py`` loads them with ``namespace="CELERY"``.
See README.md for why each value differs from the seed.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str | None = None) -> str:
    """The variable's value; a variable without a default must be set."""
    value = os.environ.get(name, default)
    if value is None:
        raise ImproperlyConfigured(f"environment variable {name} is required")
    return value


def env_bool(name: str, *, default: bool) -> bool:
    """A boolean variable: 1/true/yes/on or 0/false/no/off (case-insensitive)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"environment variable {name}={raw!r} is not a boolean")


def env_int(name: str, default: int) -> int:
    """An integer variable."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"environment variable {name}={raw!r} is not an integer") from exc


def env_secret(name: str, default: str | None = None) -> str:
    """A secret from NAME, or from the file NAME_FILE names (Docker/Swarm secrets: /run/secrets/...)."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        if name in os.environ:
            raise ImproperlyConfigured(f"set {name} or {name}_FILE, not both")
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={path!r} cannot be read: {exc.strerror}") from exc
        if not value:
            raise ImproperlyConfigured(f"{name}_FILE={path!r} is empty")
        return value
    return env_str(name, default)


# Values published in this repository (dev.env, old compose defaults) and other well-known ones: anyone can
# read them, so outside the explicit development mode they are refused (README.md, "Secrets").
KNOWN_DEV_SECRETS = frozenset({
    "dev-only-insecure-secret-key-change-me", "postgres", "password", "secret", "changeme", "change-me",
    "dev-only-insecure-redis-password",
})


def refuse_known_secret(name: str, value: str, *, min_length: int) -> None:
    if DEV_MODE:
        return
    if value in KNOWN_DEV_SECRETS or value.startswith("django-insecure") or len(value) < min_length:
        raise ImproperlyConfigured(
            f"{name} is a development value or shorter than {min_length} characters; set a random one "
            "(scripts/up generates them), or STACK_DEV_MODE=1 for a local development stack"
        )


def env_list(name: str, default: str) -> list[str]:
    """A comma-separated list variable."""
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


def database_from_url(url: str) -> dict[str, Any]:
    """Django DATABASES entry from ``postgres://user:password@host:port/name`` or ``sqlite:///path``.

    Query parameters of a postgres URL (e.g. ``?sslmode=require``) become psycopg connection OPTIONS.
    """
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        # sqlite:///relative.db, sqlite:////abs/path.db, sqlite:///:memory:
        name = parts.path[1:] if parts.path.startswith("/") else parts.path
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": name or ":memory:", "OPTIONS": {}}
    if parts.scheme not in {"postgres", "postgresql", "pgsql"}:
        raise ImproperlyConfigured(f"DATABASE_URL scheme {parts.scheme!r} is not supported")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "OPTIONS": dict(parse_qsl(parts.query)),
    }


# --- Django -------------------------------------------------------------------------------------------

DEBUG = env_bool("DJANGO_DEBUG", default=False)
# Set by the test suite only; it is the one thing that allows eager Celery (see core/startup.py).
TESTING = env_bool("DJANGO_TESTING", default=False)
# The explicit development mode (stack/dev.env): the only one in which published secrets are accepted.
DEV_MODE = env_bool("STACK_DEV_MODE", default=False) or DEBUG or TESTING
# Required, from DJANGO_SECRET_KEY or DJANGO_SECRET_KEY_FILE; a published or short key is refused.
SECRET_KEY = env_secret("DJANGO_SECRET_KEY")
refuse_known_secret("DJANGO_SECRET_KEY", SECRET_KEY, min_length=32)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,web")

INSTALLED_APPS = [
    "reports.apps.ReportsConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# --- `manage.py check --deploy` (tests/stack/test_stack_deploy_check.py fails on any unexplained warning) ---
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
# TLS ends at the load balancer in front of web (the stack publishes web on 127.0.0.1 only): where it ends
# at Django instead, or to have Django redirect and send HSTS, set these.
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", default=False)
# The healthcheck and the io pool's calls reach web over plain HTTP inside the stack's network.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^slow$"]
SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 0)
if env_bool("DJANGO_BEHIND_TLS_PROXY", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# A message delivered this many times without finishing (its worker died each time) is failed for good
# (reports/recording.py): acks_late + reject_on_worker_lost would otherwise re-run a poison task forever.
CELERY_MAX_DELIVERIES = env_int("CELERY_MAX_DELIVERIES", 5)
if CELERY_MAX_DELIVERIES < 1:
    raise ImproperlyConfigured(f"CELERY_MAX_DELIVERIES={CELERY_MAX_DELIVERIES} must be at least 1")
# Warnings explained rather than fixed, one comment each:
SILENCED_SYSTEM_CHECKS = [
    # security.W003 (no CsrfViewMiddleware): a JSON API with no cookie or session authentication; CSRF
    # protection guards cookie-authenticated browsers, which this app never serves.
    "security.W003",
    # security.W004 (no HSTS) and security.W008 (no SSL redirect): TLS and its redirect belong to the load
    # balancer in front of web (above); DJANGO_HSTS_SECONDS / DJANGO_SECURE_SSL_REDIRECT turn them on here.
    "security.W004",
    "security.W008",
]

ROOT_URLCONF = "core.urls"
WSGI_APPLICATION = "core.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": []},
    },
]

# Connection reuse: CONN_MAX_AGE, not Django 5.2's pool (README.md, "Database connections"). The seed's
# OPTIONS={"MAX_CONNS": 4} is not a Django setting: OPTIONS is handed to psycopg.connect() as libpq
# parameters, and libpq rejects it ('invalid connection option "MAX_CONNS"').
def database_from_parts() -> dict[str, Any]:
    """Django DATABASES entry from DB_HOST, DB_PORT, DB_NAME, DB_USER and DB_PASSWORD (or DB_PASSWORD_FILE):
    separate variables, so a password with '/', '@' or '%41' needs no URL quoting."""
    password = env_secret("DB_PASSWORD")
    refuse_known_secret("DB_PASSWORD", password, min_length=12)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": env_str("DB_NAME", "stack"),
        "USER": env_str("DB_USER", "app"),
        "PASSWORD": password,
        "HOST": env_str("DB_HOST", "db"),
        "PORT": env_str("DB_PORT", "5432"),
        "OPTIONS": {},
    }


def database_from_url_checked(url: str) -> dict[str, Any]:
    """DATABASE_URL's entry, its password held to the same rule as DB_PASSWORD (SQLite has none)."""
    entry = database_from_url(url)
    if entry["ENGINE"].endswith("postgresql"):
        refuse_known_secret("DATABASE_URL's password", entry["PASSWORD"], min_length=12)
    return entry


DATABASES = {
    "default": {
        **(database_from_url_checked(os.environ["DATABASE_URL"]) if os.environ.get("DATABASE_URL")
           else database_from_parts()),
        # gunicorn threads keep one connection each for up to 60 s. In workers Celery's Django fixup
        # closes the connection before and after every task, so a pool process holds at most one
        # connection, and only while a task runs.
        "CONN_MAX_AGE": env_int("DB_CONN_MAX_AGE", 60),
        "CONN_HEALTH_CHECKS": True,
    },
}
if DATABASES["default"]["ENGINE"].endswith("postgresql"):
    DATABASES["default"]["OPTIONS"].setdefault("connect_timeout", env_int("DB_CONNECT_TIMEOUT", 5))
    # Shows up in pg_stat_activity, so connections can be counted per pool.
    DATABASES["default"]["OPTIONS"].setdefault(
        "application_name", env_str("DB_APPLICATION_NAME", f"stack@{socket.gethostname()}")[:63]
    )

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

# Notifications go to files (one file per message) unless another backend is configured.
EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.filebased.EmailBackend")
EMAIL_FILE_PATH = env_str("EMAIL_FILE_PATH", str(BASE_DIR / "var" / "mail"))
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "reports@stack.invalid")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}

# --- The app ------------------------------------------------------------------------------------------

# The io_intensive tasks call the web service's own /slow endpoint: a service name, never localhost.
SLOW_ENDPOINT_URL = env_str("SLOW_ENDPOINT_URL", "http://web:8000/slow")
SLOW_MAX_MS = env_int("SLOW_MAX_MS", 10_000)

# --- Celery -------------------------------------------------------------------------------------------

QUEUE_FAST = "fast"
QUEUE_CPU = "cpu_intensive"
QUEUE_IO = "io_intensive"
QUEUES = (QUEUE_FAST, QUEUE_CPU, QUEUE_IO)

def redis_url_with_password(name: str, url: str, password: str) -> str:
    """`url` with the Redis password in it, URL-quoted (a '/', '@' or '%' in it must not change the URL's
    meaning). The password comes from REDIS_PASSWORD (or _FILE), or from the URL itself, not from both; outside
    the development mode a Redis URL without one, or with a published or short one, is refused."""
    parts = urlsplit(url)
    if parts.scheme not in {"redis", "rediss"}:
        return url  # memory://, cache+memory:// (the test suite): no server to authenticate to
    if parts.password is not None and password:
        raise ImproperlyConfigured(f"{name} has a password and REDIS_PASSWORD is set too: set one of them")
    if not password:
        password = unquote(parts.password or "")
        if not password and not DEV_MODE:
            raise ImproperlyConfigured(
                f"{name}: the stack's Redis needs a password: set REDIS_PASSWORD (scripts/up generates one), or "
                "STACK_DEV_MODE=1 for a local development stack"
            )
        refuse_known_secret(f"{name}'s password", password, min_length=16)
        return url
    refuse_known_secret("REDIS_PASSWORD", password, min_length=16)
    user = quote(unquote(parts.username or ""), safe="")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


# The password of the stack's two Redis servers (the broker and the result store): a separate variable, as
# DB_PASSWORD is, put into the URLs here, quoted.
REDIS_PASSWORD = env_secret("REDIS_PASSWORD", "")

# Service names, never localhost (the seed's "Docker Networking Failures").
CELERY_BROKER_URL = redis_url_with_password(
    "CELERY_BROKER_URL", env_str("CELERY_BROKER_URL", "redis://redis:6379/0"), REDIS_PASSWORD
)
# Celery reads the variable CELERY_BROKER_URL itself, ahead of this setting (celery.app.utils.Settings): given
# the compose files' URL without the password, every worker and the web would connect without it.
os.environ["CELERY_BROKER_URL"] = CELERY_BROKER_URL
# The URL comes from RESULT_BACKEND_URL, not CELERY_RESULT_BACKEND: Celery reads an environment variable
# of that name itself and would let it override this setting. A Redis result store is used through
# core/results.py (no pub/sub subscription per published task).
if "CELERY_RESULT_BACKEND" in os.environ:
    raise ImproperlyConfigured("set RESULT_BACKEND_URL, not CELERY_RESULT_BACKEND (see core/results.py)")
_RESULT_BACKEND_URL = redis_url_with_password(
    "RESULT_BACKEND_URL", env_str("RESULT_BACKEND_URL", "redis://redis-results:6379/0"), REDIS_PASSWORD
)
CELERY_RESULT_BACKEND = (
    f"core.results:KeyOnlyRedisBackend+{_RESULT_BACKEND_URL}"
    if _RESULT_BACKEND_URL.startswith(("redis://", "rediss://"))
    else _RESULT_BACKEND_URL
)

# Routing by task name; each worker pool consumes exactly one of these queues.
CELERY_TASK_ROUTES = {
    "reports.tasks.send_notification": {"queue": QUEUE_FAST},
    "reports.tasks.generate_report": {"queue": QUEUE_CPU},
    "reports.tasks.fetch_slow": {"queue": QUEUE_IO},
}
# An unrouted task would otherwise land in the queue "celery", which no pool consumes (the seed's
# "Infinite Task Pending State"); reports/checks.py also fails the start if a task has no route.
CELERY_TASK_DEFAULT_QUEUE = QUEUE_FAST

CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = "UTC"

# Reliability: acknowledge after the task ran, so a crash redelivers it instead of losing it...
CELERY_TASK_ACKS_LATE = True
# ...and when the pool process itself dies (OOM kill, segfault) requeue instead of acking.
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# One message per pool process: no hoarding, and messages a worker holds are visible as unacked.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Recycle prefork children (README.md explains 500 over the seed's other figure, 1000) and also by memory.
CELERY_WORKER_MAX_TASKS_PER_CHILD = env_int("CELERY_WORKER_MAX_TASKS_PER_CHILD", 500)
CELERY_WORKER_MAX_MEMORY_PER_CHILD = env_int("CELERY_WORKER_MAX_MEMORY_PER_CHILD_KB", 150_000)  # KiB

# Results are off unless a task opts in (generate_report does); the ones kept expire after an hour.
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_EXPIRES = 3600

# Celery's Django fixup closes the DB connection around EVERY task unless this is set (the setting is read
# under this exact name); it then closes only every N tasks. core/celery.py runs Django's own
# close_old_connections() around each task instead, which honours CONN_MAX_AGE and drops broken
# connections, as Django does around each web request.
CELERY_DB_REUSE_MAX = env_int("CELERY_DB_REUSE_MAX", 1000)

# Default limits; each task sets tighter ones. The hard limit is the longest any task may run.
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 60)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 90)
# Longest countdown/ETA this app schedules (fetch_slow's retry back-off is capped at it).
MAX_COUNTDOWN_S = 30

# Redis redelivers a message that was delivered but not acked within visibility_timeout; with acks_late
# that is any task still running, and any ETA/countdown message a worker holds. It must be longer than
# the longest task plus the longest ETA, or tasks run twice. It is also how long a message orphaned by a
# SIGKILLed worker waits before it runs again (README.md).
BROKER_VISIBILITY_TIMEOUT = env_int("CELERY_VISIBILITY_TIMEOUT", 600)
if BROKER_VISIBILITY_TIMEOUT <= CELERY_TASK_TIME_LIMIT + MAX_COUNTDOWN_S:
    raise ImproperlyConfigured(
        f"CELERY_VISIBILITY_TIMEOUT={BROKER_VISIBILITY_TIMEOUT} must exceed the task time limit "
        f"({CELERY_TASK_TIME_LIMIT} s) plus the longest countdown ({MAX_COUNTDOWN_S} s)"
    )
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": BROKER_VISIBILITY_TIMEOUT,
    "socket_connect_timeout": 5,
    "socket_timeout": 10,
    "socket_keepalive": True,
    "retry_on_timeout": True,
    "health_check_interval": 25,
}
# Publishing stops (POST /reports/ answers 503) while the broker uses this much of its maxmemory: at
# maxmemory with noeviction kombu loses the message a worker pops (its unacked write is refused), so the
# workers need headroom to drain the queues (autoscaler/publish_guard.py).
BROKER_PUBLISH_LIMIT_PERCENT = env_int("BROKER_PUBLISH_LIMIT_PERCENT", 80)
if not 1 <= BROKER_PUBLISH_LIMIT_PERCENT <= 100:
    raise ImproperlyConfigured(f"BROKER_PUBLISH_LIMIT_PERCENT={BROKER_PUBLISH_LIMIT_PERCENT} must be 1..100")
CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = {"socket_connect_timeout": 5, "socket_timeout": 10}

# A web request must not hang on a dead broker: a couple of quick retries, then the view answers 503.
CELERY_TASK_PUBLISH_RETRY = True
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.5,
}

# OFF by default, against the usual advice (and Celery 6's planned default): with the Redis transport it
# LOSES tasks. On a broker connection loss the worker SIGTERMs its running acks_late tasks, expecting the
# broker to requeue them as RabbitMQ does when a channel closes; Redis keeps them in its `unacked` hash,
# and once the worker reconnects it marks them REVOKED ("terminated") and acks them: gone (measured with
# Celery 5.7 / kombu 5.7: 2 of 2 running reports lost per Redis restart; TaskRun rows "failed",
# SystemExit). Left off, the running tasks finish; their acks either go through after the reconnect or
# the messages come back after the visibility timeout and the second delivery is counted (attempts) and
# skipped (duplicates_skipped). CELERY_CANCEL_LONG_RUNNING_ON_CONNECTION_LOSS=1 turns it on (RabbitMQ).
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = env_bool(
    "CELERY_CANCEL_LONG_RUNNING_ON_CONNECTION_LOSS", default=False
)
# Keep retrying the broker at start-up (Redis may come up after the worker).
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_MAX_RETRIES = None

# Eager mode runs tasks inside the web request (the seed's "Synchronous Task Execution"). Only the test
# suite may turn it on; core/startup.py refuses to start anything else with it.
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_TASK_EAGER_PROPAGATES = CELERY_TASK_ALWAYS_EAGER

# A new pool process must report for duty within this time or it is killed and replaced. Celery's 4 s is
# too short on a saturated host (worker-cpu runs with a low CPU weight), which showed up as "Timed out
# waiting for UP message" and SIGKILLed children after a reconnect.
CELERY_WORKER_PROC_ALIVE_TIMEOUT = 30

CELERY_WORKER_SEND_TASK_EVENTS = False
CELERY_TASK_SEND_SENT_EVENT = False

# Not Celery settings (no CELERY_ prefix): the worker liveness file, touched by a consumer bootstep
# while the worker is connected to the broker (core/celery.py).
WORKER_LIVENESS_FILE = env_str("WORKER_LIVENESS_FILE", "/tmp/celery-worker-alive")  # noqa: S108
WORKER_LIVENESS_INTERVAL = env_int("WORKER_LIVENESS_INTERVAL", 10)
