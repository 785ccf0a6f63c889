"""The policy file's model: what ops write in `policies/*.yaml`, validated by pydantic.

Pure data and validation only; loading YAML and locating errors in the file is `policy.load`.
Durations are written like `30s`, `5m`, `1h30m` (or a plain number of seconds) and held as float seconds.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

__all__ = [
    "DEFAULT_PRIORITY_STEPS",
    "DEFAULT_SEPARATOR",
    "BrokerOptions",
    "ComposeTarget",
    "Cooldown",
    "Duration",
    "Metric",
    "MetricFailure",
    "PerReplica",
    "Policy",
    "PoolPolicy",
    "StepLimit",
    "SwarmTarget",
    "Target",
    "Tier",
    "format_duration",
    "parse_duration",
    "semantic_errors",
]

# kombu's Redis transport defaults (kombu/transport/redis.py: PRIORITY_STEPS, sep).
DEFAULT_PRIORITY_STEPS = (0, 3, 6, 9)
DEFAULT_SEPARATOR = "\x06\x16"

# The context flag that lets the loader run the semantic checks itself, to report each at its own line.
DEFER_SEMANTIC_CHECKS = "defer_semantic_checks"

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
# Bounds on every number a policy holds, so that no edit can make the arithmetic overflow (a per-replica
# target of 1e-320 made ceil() raise, an interval of 1e300 made the tick's wait raise) or ask for
# absurdities. Each is far beyond any real use.
MAX_DURATION = 7 * 86400.0  # a week
MIN_INTERVAL = 0.25
MAX_INTERVAL = 3600.0
MAX_REPLICAS = 10_000
MAX_METRIC = 1e12  # tier bounds, per-replica targets, activation
MIN_PER_REPLICA = 1e-3
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """`30s`, `5m`, `1h30m`, `250ms` or a number of seconds -> float seconds (>= 0)."""
    if isinstance(value, bool):
        raise ValueError("a duration must be like 30s, 5m or 1h30m, not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        parts = _DURATION_PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"invalid duration {value!r}: write it like 30s, 5m, 1h30m or 250ms")
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    else:
        raise ValueError(f"invalid duration {value!r}: write it like 30s, 5m or 1h30m")
    if seconds < 0 or math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"invalid duration {value!r}: must be a finite, non-negative time")
    if seconds > MAX_DURATION:
        raise ValueError(f"invalid duration {value!r}: at most {format_duration(MAX_DURATION)}")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds -> the shortest readable form (`90` -> `1m30s`), for messages and schema defaults."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    out, rest = "", seconds
    for unit, size in (("h", 3600), ("m", 60)):
        whole = int(rest // size)
        if whole:
            out += f"{whole}{unit}"
            rest -= whole * size
    if rest:
        out += f"{rest:g}s"
    return out


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^(\d+(\.\d+)?(ms|s|m|h|d))+$", "examples": ["30s", "5m", "1h30m"]},
                {"type": "number", "minimum": 0},
            ]
        }
    ),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Metric(StrEnum):
    """What a pool scales on."""

    WAITING = "waiting"  # messages in the queue lists, priority sub-lists included
    WAITING_UNACKED = "waiting_unacked"  # plus prefetched/reserved/running under acks_late
    LATENCY = "latency"  # age in seconds of the oldest waiting message


class ComposeTarget(_Strict):
    service: str = Field(min_length=1, description="Compose service name, e.g. worker-fast")
    project: str | None = Field(
        default=None, description="Compose project; default from settings or the controller's own project"
    )


class SwarmTarget(_Strict):
    service: str = Field(min_length=1, description="Swarm service name, e.g. mystack_worker-fast")


class Target(_Strict):
    """Exactly one of `compose` or `swarm`."""

    compose: ComposeTarget | None = None
    swarm: SwarmTarget | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        if (self.compose is None) == (self.swarm is None):
            raise ValueError("set exactly one of `compose` or `swarm`")
        return self

    @property
    def kind(self) -> Literal["compose", "swarm"]:
        return "compose" if self.compose is not None else "swarm"

    @property
    def service(self) -> str:
        chosen = self.compose or self.swarm
        assert chosen is not None  # guaranteed by _exactly_one
        return chosen.service


class Tier(_Strict):
    """An exact-capacity step: when the metric is `above` (or `below`) the bound, run `replicas`."""

    above: float | None = Field(default=None, ge=0, le=MAX_METRIC, allow_inf_nan=False)
    below: float | None = Field(default=None, gt=0, le=MAX_METRIC, allow_inf_nan=False)
    replicas: int = Field(ge=0, le=MAX_REPLICAS)

    @model_validator(mode="after")
    def _one_bound(self) -> Tier:
        if (self.above is None) == (self.below is None):
            raise ValueError("a tier needs exactly one of `above` or `below`")
        return self

    @property
    def bound(self) -> float:
        return self.above if self.above is not None else self.below  # type: ignore[return-value]


class PerReplica(_Strict):
    """KEDA/HPA-style target: desired = ceil(metric / value), held while within `tolerance`."""

    value: float = Field(
        ge=MIN_PER_REPLICA, le=MAX_METRIC, allow_inf_nan=False,
        description="work (or seconds of latency) one replica should carry",
    )
    tolerance: float = Field(
        default=0.1, ge=0, lt=1, allow_inf_nan=False, description="relative dead band around the target"
    )
    activation: float = Field(
        default=0, ge=0, le=MAX_METRIC, allow_inf_nan=False, description="from zero replicas, wake only above this"
    )


class Cooldown(_Strict):
    up: Duration = Field(default=30.0, description="after a scale-up, no further scale-up for this long")
    down: Duration = Field(default=300.0, description="after any scaling action, no scale-down for this long")


class StepLimit(_Strict):
    up: int | None = Field(default=None, ge=1, le=MAX_REPLICAS, description="most replicas added by one action")
    down: int | None = Field(
        default=None, ge=1, le=MAX_REPLICAS, description="most replicas removed by one action"
    )


class MetricFailure(_Strict):
    """What to do when the metric cannot be read: hold (default) or go to a fixed count after N ticks."""

    action: Literal["hold", "fixed"] = "hold"
    replicas: int | None = Field(default=None, ge=0, le=MAX_REPLICAS)
    after: int = Field(default=3, ge=1, le=MAX_REPLICAS, description="consecutive failed ticks before the fixed count")

    @model_validator(mode="after")
    def _fixed_needs_replicas(self) -> MetricFailure:
        if self.action == "fixed" and self.replicas is None:
            raise ValueError("action `fixed` needs `replicas`")
        if self.action == "hold" and self.replicas is not None:
            raise ValueError("`replicas` only applies to action `fixed`")
        return self


class PoolPolicy(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    target: Target
    queues: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    min: int = Field(ge=0, le=MAX_REPLICAS)
    max: int = Field(ge=0, le=MAX_REPLICAS)
    surge: int = Field(
        default=0, ge=0, le=MAX_REPLICAS,
        description="replicas allowed above max only while others are being stopped (they count toward max)",
    )
    warm: int = Field(
        default=0, ge=0, le=MAX_REPLICAS,
        description="booted standby workers that consume none of the pool's queues until activated (Compose only);"
        " they count toward max + warm, not as capacity",
    )
    metric: Metric = Metric.WAITING
    tiers: list[Tier] | None = Field(default=None, min_length=1)
    per_replica: PerReplica | None = None
    cooldown: Cooldown = Cooldown()
    stabilization: Duration = Field(
        default=300.0, description="scale down only to the highest recommendation seen in this window"
    )
    sustain: Duration = Field(default=0.0, description="scale up only once the recommendation has held this long")
    max_step: StepLimit = StepLimit()
    on_metric_failure: MetricFailure = MetricFailure()
    enabled: bool = Field(default=True, description="false = paused: observe and report, never act")
    scale_in: bool = Field(default=True, description="false = never scale down (scale-in paused)")
    stop_timeout: Duration = Field(
        default=600.0, description="grace for a worker's warm shutdown; must outlast the longest task"
    )

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> PoolPolicy:
        if info.context and info.context.get(DEFER_SEMANTIC_CHECKS):
            return self
        problems = semantic_errors(self)
        if problems:
            raise ValueError("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems))
        return self

    @property
    def strategy(self) -> Literal["tiers", "per_replica"]:
        return "tiers" if self.tiers is not None else "per_replica"


def _tier_errors(pool: PoolPolicy, tiers: list[Tier]) -> list[tuple[tuple[str | int, ...], str]]:
    errors: list[tuple[tuple[str | int, ...], str]] = []
    for i, tier in enumerate(tiers):
        if not pool.min <= tier.replicas <= pool.max:
            errors.append((("tiers", i, "replicas"), f"{tier.replicas} is outside min..max ({pool.min}..{pool.max})"))
    # Written top-down as the seed reads: every `above` tier first, then every `below` tier, each
    # with strictly falling bounds and non-increasing replicas. That ordering is what makes the
    # tiers non-overlapping and "more work never means fewer replicas".
    seen_below = False
    for i, tier in enumerate(tiers):
        if tier.below is not None:
            seen_below = True
        elif seen_below:
            errors.append((("tiers", i), "`above` tiers must come before `below` tiers"))
    for i in range(1, len(tiers)):
        prev, cur = tiers[i - 1], tiers[i]
        if (prev.above is None) != (cur.above is None):
            if prev.above is not None and cur.below is not None and cur.below > prev.above:
                errors.append((("tiers", i, "below"), f"{cur.below:g} overlaps the `above: {prev.above:g}` tier"))
        elif cur.bound >= prev.bound:
            errors.append(
                (("tiers", i), f"bounds must fall from one tier to the next ({cur.bound:g} after {prev.bound:g})")
            )
        if cur.replicas > prev.replicas:
            errors.append(
                (
                    ("tiers", i, "replicas"),
                    f"{cur.replicas} is more than the tier above it ({prev.replicas}): less work "
                    "must never ask for more replicas",
                )
            )
    return errors


def semantic_errors(pool: PoolPolicy) -> list[tuple[tuple[str | int, ...], str]]:
    """Cross-field checks, each with the field path it belongs to (relative to the pool)."""
    errors: list[tuple[tuple[str | int, ...], str]] = []
    if pool.min > pool.max:
        errors.append((("min",), f"min ({pool.min}) is greater than max ({pool.max})"))
    if (pool.tiers is None) == (pool.per_replica is None):
        errors.append((("tiers",), "set exactly one strategy: `tiers` or `per_replica`"))
    if pool.tiers is not None:
        errors.extend(_tier_errors(pool, pool.tiers))
    if pool.warm and pool.target.kind != "compose":
        # Swarm keeps one task spec per service: a standby's label and command would need a service of its own.
        errors.append((("warm",), "warm standbys are only supported for Compose targets"))
    fb = pool.on_metric_failure
    if fb.replicas is not None and not pool.min <= fb.replicas <= pool.max:
        errors.append(
            (
                ("on_metric_failure", "replicas"),
                f"{fb.replicas} is outside min..max ({pool.min}..{pool.max})",
            )
        )
    return errors


class BrokerOptions(_Strict):
    """kombu Redis transport options, only where the Celery app sets non-default ones."""

    key_prefix: str = Field(default="", description="kombu `global_keyprefix` transport option")
    priority_steps: list[Annotated[int, Field(ge=0, le=255)]] = Field(
        default=list(DEFAULT_PRIORITY_STEPS), min_length=1, description="kombu `priority_steps`"
    )
    separator: str = Field(default=DEFAULT_SEPARATOR, min_length=1, description="kombu `sep`")
    unacked_key: str = Field(default="unacked", min_length=1, description="kombu `unacked_key`")
    unacked_sample: int = Field(
        default=2000,
        ge=1,
        le=1_000_000,
        description="largest number of unacked entries read per tick; larger hashes are sampled",
    )
    unacked_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        le=1 << 30,
        description="most bytes of unacked entries (whole messages) read per tick; beyond, counts are estimated",
    )

    @field_validator("priority_steps")
    @classmethod
    def _steps_sorted(cls, steps: list[int]) -> list[int]:
        if sorted(set(steps)) != steps:
            raise ValueError("priority steps must be strictly increasing")
        return steps


class Policy(_Strict):
    interval: Duration = Field(
        default=15.0, ge=MIN_INTERVAL, le=MAX_INTERVAL, description="time between ticks (250ms..1h)"
    )
    dry_run: bool = Field(default=False, description="decide and log, never act")
    push: bool = Field(
        default=True,
        description="between ticks, watch the pools' queue lengths (every 250ms) and decide a pool's scale-up at "
        "once when its queues reach a count that asks for more; false: decide only every `interval`",
    )
    broker: BrokerOptions = BrokerOptions()
    pools: list[PoolPolicy] = Field(min_length=1)

    @field_validator("pools", mode="before")
    @classmethod
    def _pools_from_mapping(cls, value: Any) -> Any:
        # Ops write pools as a mapping keyed by name; the model keeps an ordered list with the name inside.
        if isinstance(value, dict):
            return [{"name": name, **body} if isinstance(body, dict) else body for name, body in value.items()]
        return value

    @model_validator(mode="after")
    def _unique(self) -> Policy:
        owners: dict[tuple[str, str], str] = {}
        for pool in self.pools:
            key = (pool.target.kind, pool.target.service)
            if key in owners:
                raise ValueError(f"pools {owners[key]!r} and {pool.name!r} both target {key[0]} service {key[1]!r}")
            owners[key] = pool.name
        return self

    def pool(self, name: str) -> PoolPolicy:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)

    @property
    def queues(self) -> list[str]:
        """Every queue any pool consumes, each once, in policy order."""
        return list(dict.fromkeys(q for pool in self.pools for q in pool.queues))
