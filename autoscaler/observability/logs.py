"""Logging setup: readable lines on a terminal, one JSON object per line otherwise (for log shippers)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from loguru import logger

if TYPE_CHECKING:
    from loguru import Message

    from autoscaler.actions import ActionResult
    from autoscaler.types import Decision, QueueStats

__all__ = ["configure_logging", "json_sink", "log_decision"]

_TEXT_FORMAT = "<green>{time:YYYY-MM-DD HH:mm:ss}</green> <level>{level: <7}</level> {message}"


def json_sink(stream: TextIO) -> Any:
    """A loguru sink writing compact JSON lines: time, level, message, and every bound field."""

    def write(message: Message) -> None:
        record = message.record
        line: dict[str, Any] = {
            "time": record["time"].astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            if isinstance(record["time"], datetime)
            else str(record["time"]),
            "level": record["level"].name,
            "message": record["message"],
        }
        line.update({k: v for k, v in record["extra"].items() if k not in line})
        if record["exception"] is not None:
            line["exception"] = str(record["exception"].value)
        stream.write(json.dumps(line, default=str) + "\n")
        stream.flush()

    return write


def configure_logging(*, fmt: str = "auto", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route loguru to `stream` (stderr) as text when it is a terminal (or fmt=text), else as JSON lines."""
    out = stream or sys.stderr
    logger.remove()
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    if use_json:
        logger.add(json_sink(out), level=level.upper())
    else:
        logger.add(out, level=level.upper(), format=_TEXT_FORMAT, colorize=out.isatty())


def log_decision(decision: Decision, queues: tuple[QueueStats, ...], action: ActionResult | None) -> None:
    """One line per pool per tick: the decision, its reason and the queues it saw (JSON fields too)."""
    fields: dict[str, Any] = {
        "pool": decision.pool,
        "current": decision.current,
        "desired": decision.desired,
        "direction": str(decision.direction),
        "metric": decision.metric,
        "reason": decision.reason,
        "queues": {q.name: {"waiting": q.waiting, "unacked": q.unacked, "latency_s": q.latency_s} for q in queues},
    }
    if action is not None:
        fields["action"] = "dry_run" if action.dry_run else ("ok" if action.ok else "error")
    logger.bind(**fields).info(
        "pool {} current={} desired={} metric={}: {}",
        decision.pool,
        decision.current,
        decision.desired,
        decision.metric,
        decision.reason,
    )
