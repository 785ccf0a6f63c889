"""Process settings: environment variables prefixed `AUTOSCALER_`, overridden by CLI flags.

The policy file says how pools scale; these say where things are (Redis, Docker, the policy file) and how
this process behaves (ports, log format, leader lock).
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AUTOSCALER_", extra="ignore")

    redis_url: str = Field(
        default="redis://localhost:6379/0",
        description="Celery's broker: redis://[:password@]host:port/db or rediss:// for TLS",
    )
    policy: str = Field(default="policies/default.yaml", description="policy file to load and watch")
    dry_run: bool | None = Field(default=None, description="overrides the policy's dry_run when set")
    interval: float | None = Field(default=None, gt=0, description="overrides the policy's interval (seconds)")
    state_prefix: str = Field(default="autoscaler:", description="prefix of the controller's own Redis keys")
    state_redis_url: str | None = Field(
        default=None, description="where state and the leader lock live; default: redis_url"
    )
    instance_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}",
        description="this controller replica's name in the leader lock",
    )
    leader_ttl: float | None = Field(
        default=None,
        gt=0,
        description="leader lock expiry in seconds; default: 2 x interval (a standby "
        "then takes over within two intervals of the leader's death)",
    )
    metrics_port: int = Field(default=9419, ge=0, le=65535, description="/metrics, /healthz, /readyz; 0 = off")
    metrics_host: str = Field(default="0.0.0.0", description="address the HTTP endpoint binds")  # noqa: S104
    log_format: Literal["auto", "json", "text"] = "auto"
    log_level: str = "INFO"
    docker_host: str | None = Field(default=None, description="overrides DOCKER_HOST")
    compose_project: str | None = Field(default=None, description="default Compose project for pools that name none")
    busy_probe_timeout: float = Field(default=1.0, gt=0, description="how long to ask Celery which workers are busy")
