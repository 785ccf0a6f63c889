"""Broker checks (Redis): eviction policy, persistence, memory headroom, the default user's password.

`broker_findings` is pure: it judges an INFO answer and a CONFIG GET answer as read, whatever they hold
(missing fields, strings where numbers belong, nonsense), and never raises. `read_broker` does the reading:
INFO, CONFIG GET and ACL GETUSER, all read-only; a refused CONFIG or ACL (renamed or forbidden by an ACL,
as managed Redis services do) is reported as "cannot tell", not as a failure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from autoscaler.doctor.findings import CannotCheckError, Finding, Status
from autoscaler.doctor.redact import printable, redact_url, safe_error

__all__ = ["MEMORY_FAIL_PERCENT", "MEMORY_WARN_PERCENT", "BrokerFacts", "broker_findings", "read_broker"]

MEMORY_WARN_PERCENT = 80.0  # the seed's alert threshold; the stack's publish guard stops producers here
MEMORY_FAIL_PERCENT = 95.0  # at maxmemory a noeviction broker refuses writes and kombu loses popped messages


@dataclass(frozen=True)
class BrokerFacts:
    url: str  # redacted
    info: Mapping[str, Any]
    config: Mapping[str, Any] = field(default_factory=dict)  # CONFIG GET answers; empty if refused
    default_user_flags: tuple[str, ...] | None = None  # ACL GETUSER default flags; None if unknown
    url_has_password: bool = False


def _number(value: Any) -> float | None:
    """A finite number from an INFO/CONFIG field, or None (bools, NaN, inf, text that is no number)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | bytes):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _eviction(facts: BrokerFacts) -> Finding:
    why = "with eviction on, Redis deletes queued tasks (whole queue lists) when memory runs out"
    fix = "run the broker with --maxmemory-policy noeviction (and keep results in another Redis)"
    policy = _text(facts.info.get("maxmemory_policy")) or _text(facts.config.get("maxmemory-policy"))
    if policy is None:
        return Finding("broker", "eviction policy", Status.WARN, "INFO and CONFIG do not say the maxmemory-policy",
                       why, fix, facts.url)
    status = Status.PASS if policy == "noeviction" else Status.FAIL
    saw = f"maxmemory-policy {printable(policy, 40)}"
    return Finding("broker", "eviction policy", status, saw, why, fix, facts.url)


def _persistence(facts: BrokerFacts) -> Finding:
    why = "without persistence a Redis restart or crash loses every queued task"
    fix = "--appendonly yes (AOF) and a volume for /data"
    aof = _number(facts.info.get("aof_enabled"))
    save = _text(facts.config.get("save"))
    if aof == 1:
        return Finding("broker", "persistence", Status.PASS, "AOF on", why, fix, facts.url)
    if aof is None:
        return Finding("broker", "persistence", Status.WARN, "INFO does not say whether AOF is on", why, fix,
                       facts.url)
    if save is None:
        return Finding("broker", "persistence", Status.WARN,
                       "AOF off; RDB snapshots unknown (CONFIG GET save refused)", why, fix, facts.url)
    if save.strip():
        return Finding("broker", "persistence", Status.WARN,
                       f"AOF off, RDB snapshots only (save {printable(save, 60)}): a crash loses what came since",
                       why, fix, facts.url)
    return Finding("broker", "persistence", Status.FAIL, "AOF off and no RDB save", why, fix, facts.url)


def _memory(facts: BrokerFacts) -> list[Finding]:
    limit = _number(facts.info.get("maxmemory"))
    used = _number(facts.info.get("used_memory"))
    if limit is None:
        limit = _number(facts.config.get("maxmemory"))
    if limit is None or limit < 0:
        return [Finding("broker", "maxmemory", Status.WARN, "INFO does not say maxmemory", "", "", facts.url)]
    if limit == 0:
        return [Finding("broker", "maxmemory", Status.WARN, "no maxmemory: Redis may grow until the host runs out",
                        "an unbounded broker takes the host's memory (the seed's crashed production twice)",
                        "--maxmemory 512mb (below the container's memory limit) with noeviction", facts.url)]
    found = [Finding("broker", "maxmemory", Status.PASS, f"maxmemory {limit / 2**20:.0f} MiB", "", "", facts.url)]
    why = "at maxmemory a noeviction broker refuses writes: publishes fail and a worker's popped message is lost"
    fix = "raise maxmemory, drain the queues, and stop producers before 80 % (autoscaler.publish_guard)"
    if used is None or used < 0:
        found.append(Finding("broker", "memory used", Status.WARN, "INFO does not say used_memory", why, fix,
                             facts.url))
        return found
    percent = 100.0 * used / limit
    status = (Status.FAIL if percent >= MEMORY_FAIL_PERCENT else
              Status.WARN if percent > MEMORY_WARN_PERCENT else Status.PASS)
    found.append(Finding("broker", "memory used", status,
                         f"{used / 2**20:.1f} MiB used of {limit / 2**20:.0f} MiB ({percent:.0f} %; warn above "
                         f"{MEMORY_WARN_PERCENT:.0f} %, fail from {MEMORY_FAIL_PERCENT:.0f} %)", why, fix, facts.url))
    return found


def _auth(facts: BrokerFacts) -> Finding:
    why = "anyone who reaches the port can read, delete or inject tasks (and run code in the workers)"
    fix = "requirepass / an ACL user with a password, and the password in the broker URL"
    flags = facts.default_user_flags
    if flags is not None:
        open_default = "on" in flags and "nopass" in flags
        saw = f"default user flags: {printable(' '.join(flags), 80)}"
    else:
        open_default = not facts.url_has_password
        saw = "connected without a password" if open_default else "connected with a password (ACL not readable)"
    if open_default:
        return Finding("broker", "password", Status.WARN, f"the default user is open without a password ({saw})",
                       why, fix, facts.url)
    return Finding("broker", "password", Status.PASS, saw, why, fix, facts.url)


def broker_findings(facts: BrokerFacts) -> list[Finding]:
    """Every broker check on what was read; never raises, whatever `facts` holds."""
    return [_eviction(facts), _persistence(facts), *_memory(facts), _auth(facts)]


def read_broker(client: redis.Redis, url: str) -> BrokerFacts:
    """INFO, CONFIG GET and ACL GETUSER default: read-only. CannotCheckError if INFO itself fails."""
    shown = redact_url(url)
    try:
        info = client.info("all")
    except redis.RedisError as exc:
        raise CannotCheckError(f"cannot read INFO from the broker at {shown}: {safe_error(exc)}") from None
    config: dict[str, Any] = {}
    for name in ("maxmemory-policy", "save", "maxmemory"):
        try:
            answer = client.config_get(name)
        except redis.RedisError:
            continue  # CONFIG renamed or forbidden: INFO alone decides, and the finding says what is unknown
        if isinstance(answer, dict):
            config.update({str(k): v for k, v in answer.items()})
    flags: tuple[str, ...] | None = None
    try:
        user = client.acl_getuser("default")
        raw = user.get("flags") if isinstance(user, dict) else None
        if isinstance(raw, list):
            flags = tuple(printable(f, 40) for f in raw)
    except redis.RedisError:
        flags = None
    has_password = bool(client.connection_pool.connection_kwargs.get("password"))
    return BrokerFacts(url=shown, info=info if isinstance(info, dict) else {}, config=config,
                       default_user_flags=flags, url_has_password=has_password)
