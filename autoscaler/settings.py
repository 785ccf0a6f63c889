"""Process settings: environment variables prefixed `AUTOSCALER_`, overridden by CLI flags.

The policy file says how pools scale; these say where things are (Redis, Docker, the policy file) and how
this process behaves (ports, log format, leader lock).
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "SettingsError", "default_instance_id", "load_settings"]

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class SettingsError(Exception):
    """Settings that cannot be used; `problems` are lines like `AUTOSCALER_DRY_RUN='x': message`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def default_instance_id() -> str:
    """`hostname:pid:random`, unique per process: containers of one name all run as pid 1, and two replicas
    sharing an id would both hold the leader lock (each one's renewal is the other's)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AUTOSCALER_", extra="ignore")

    redis_url: str = Field(
        default="redis://localhost:6379/0",
        description="Celery's broker: redis://[:password@]host:port/db or rediss:// for TLS",
    )
    policy: str = Field(default="policies/default.yaml", description="policy file to load and watch")
    dry_run: bool | None = Field(default=None, description="overrides the policy's dry_run when set")
    interval: float | None = Field(
        default=None, ge=0.25, le=3600, allow_inf_nan=False, description="overrides the policy's interval (seconds)"
    )
    state_prefix: str = Field(default="autoscaler:", description="prefix of the controller's own Redis keys")
    state_redis_url: str | None = Field(
        default=None, description="where state and the leader lock live; default: redis_url"
    )
    # Separate from the URLs, as a deployment passes secrets (Compose cannot URL-quote): put into them here.
    redis_password: SecretStr | None = Field(default=None, description="the broker's password, if not in redis_url")
    state_redis_password: SecretStr | None = Field(
        default=None, description="the state Redis' password, if not in state_redis_url"
    )
    instance_id: str = Field(
        default_factory=default_instance_id,
        description="this controller replica's name in the leader lock; default: hostname:pid:random, unique per "
        "process (an explicit one must differ between replicas)",
    )
    leader_ttl: float | None = Field(
        default=None,
        gt=0,
        le=86400,
        allow_inf_nan=False,
        description="leader lock expiry in seconds, above the interval; default: 1.5 x the interval in "
        "force, following policy reloads (a standby then takes over within 1.75 intervals of the leader's death)",
    )
    metrics_port: int = Field(default=9419, ge=0, le=65535, description="/metrics, /healthz, /readyz; 0 = off")
    metrics_host: str = Field(default="0.0.0.0", description="address the HTTP endpoint binds")  # noqa: S104
    log_format: Literal["auto", "json", "text"] = "auto"
    log_level: str = "INFO"
    docker_host: str | None = Field(default=None, description="overrides DOCKER_HOST")
    compose_project: str | None = Field(default=None, description="default Compose project for pools that name none")
    busy_probe_timeout: float = Field(
        default=1.0, gt=0, le=60, description="how long to ask Celery which workers are busy"
    )

    @field_validator("dry_run", "interval", "leader_ttl", "state_redis_url", "docker_host", "compose_project",
                     "redis_password", "state_redis_password", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `AUTOSCALER_DRY_RUN=` (set but empty, as Compose's `${VAR:-}` gives) means "not set", not an error.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("instance_id", mode="before")
    @classmethod
    def _empty_id_is_unset(cls, value: Any) -> Any:
        # Empty, it would name every replica started that way alike, and they would all lead.
        return default_instance_id() if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_url", "state_redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(_REDIS_SCHEMES):
            raise ValueError("must start with redis://, rediss:// (TLS) or unix://, e.g. redis://redis:6379/0")
        return value

    @model_validator(mode="after")
    def _passwords_into_urls(self) -> Settings:
        if self.redis_password is not None:
            self.redis_url = with_password("AUTOSCALER_REDIS_URL", self.redis_url, self.redis_password)
        if self.state_redis_password is not None:
            if self.state_redis_url is None:
                raise ValueError("AUTOSCALER_STATE_REDIS_PASSWORD is set but AUTOSCALER_STATE_REDIS_URL is not")
            self.state_redis_url = with_password(
                "AUTOSCALER_STATE_REDIS_URL", self.state_redis_url, self.state_redis_password
            )
        return self


def with_password(name: str, url: str, password: SecretStr) -> str:
    """`url` with `password` in its user part, URL-quoted so that any character means itself. A URL that has a
    password already is refused: two of them would leave the reader guessing which one counts."""
    parts = urlsplit(url)
    if parts.password is not None:
        raise ValueError(f"{name} has a password and {name.removesuffix('_URL')}_PASSWORD is set too: set one of them")
    user = quote(unquote(parts.username or ""), safe="")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password.get_secret_value(), safe='')}@{host}"))


def load_settings(**overrides: Any) -> Settings:
    """The settings from the environment and `overrides` (flags); raises SettingsError naming each variable."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            message = str(err["msg"]).removeprefix("Value error, ")
            if not err["loc"]:  # a check across fields: its message names them, and shows no value (a password)
                problems.append(message)
                continue
            name = f"AUTOSCALER_{str(err['loc'][0]).upper()}"
            shown = "(hidden)" if name.endswith("_PASSWORD") else repr(os.environ.get(name, err.get("input")))
            problems.append(f"{name}={shown:.120}: {message}")
        raise SettingsError(problems) from exc
