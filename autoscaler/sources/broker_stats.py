"""Broker memory, task counts and worker heartbeats: one script per tick, for dashboards and alerts only.

Nothing here feeds a decision: the queue read (`celery_redis`) decides, and a failure of this read only
leaves these series out (the loop logs it and counts `autoscaler_broker_stats_errors_total`). It runs once
per tick after a queue read that reached the broker, with one attempt and the queue read's timeout.

Every value is hostile (any broker client can write the hashes, and whatever answers on the broker's
address writes INFO): a hash with more than `max_fields` fields or more than `max_bytes` bytes is not read;
a count must be 1..15 ASCII digits; a task name or host name is at most 200 / 255 characters; a heartbeat
is four fields ("<time> <interval> <memory|-> <limit|->") of bounded numbers. Each refusal is local (that
field, or that hash) and says what and where in `BrokerStats.problems`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis

from autoscaler.celery import TASK_STATES, TASKS_KEY, WORKERS_KEY
from autoscaler.policy.model import BrokerOptions
from autoscaler.sources.base import BrokerStats, SourceError, WorkerBeat

__all__ = ["MAX_HASH_BYTES", "MAX_HASH_FIELDS", "RedisBrokerStats", "parse_info_memory", "parse_reply"]

MAX_HASH_FIELDS = 1024  # 512 task names per queue in two states; 1,024 workers per queue
MAX_HASH_BYTES = 256 << 10
MAX_INFO_BYTES = 16 << 10  # a real INFO memory answer is about 1.5 KB
MAX_NAME_CHARS = 200
MAX_HOST_CHARS = 255
_COUNT = re.compile(rb"[0-9]{1,15}")
_BYTES = re.compile(rb"[0-9]{1,19}")
_NUMBER = re.compile(rb"[0-9]{1,12}(\.[0-9]{1,9})?")
_INFO_LINE = re.compile(rb"^(used_memory|maxmemory):([^\r\n]*)\r?$", re.MULTILINE)
_SCRIPT_RESOURCE = "broker_stats.lua"
MAX_INTERVAL_S = 3600.0


class RedisBrokerStats:
    """Reads the stats with one EVALSHA; implements `BrokerStatsReader`."""

    def __init__(self, client: redis.Redis, *, where: str) -> None:
        self._client = client
        self._where = where
        self._script = client.register_script(
            resources.files("autoscaler.sources").joinpath(_SCRIPT_RESOURCE).read_text(encoding="utf-8")
        )

    def read(self, queues: Sequence[str], broker: BrokerOptions) -> BrokerStats:
        names = list(dict.fromkeys(queues))
        keys = [broker.key_prefix + k.format(queue=q) for q in names for k in (TASKS_KEY, WORKERS_KEY)]
        try:
            reply = self._script(keys=keys, args=[MAX_HASH_FIELDS, MAX_HASH_BYTES, MAX_INFO_BYTES],
                                 client=self._client)
        except redis.RedisError as exc:
            raise SourceError(f"broker stats read at {self._where} failed: {type(exc).__name__}: {exc}") from exc
        return parse_reply(names, reply, where=self._where)

    def close(self) -> None:
        self._client.close()


def parse_reply(queues: Sequence[str], reply: Any, *, where: str) -> BrokerStats:
    """The script's reply as BrokerStats; raises SourceError only when the reply's shape is not the script's."""
    if not isinstance(reply, list) or len(reply) != 1 + 2 * len(queues) or not isinstance(reply[0], bytes):
        raise SourceError(f"unexpected reply from the broker stats script at {where}: {reply!r:.200}")
    problems: list[tuple[str, str, str]] = []
    used, limit, info_problems = parse_info_memory(reply[0], where=where)
    problems += [("", "broker_memory", p) for p in info_problems]
    tasks: dict[str, dict[tuple[str, str], int]] = {}
    workers: dict[str, dict[str, WorkerBeat]] = {}
    for i, queue in enumerate(queues):
        task_pairs = _pairs(reply[1 + 2 * i], queue, "task_counts", where, problems)
        tasks[queue] = _task_counts(task_pairs, queue, where, problems)
        beat_pairs = _pairs(reply[2 + 2 * i], queue, "worker_beats", where, problems)
        workers[queue] = _worker_beats(beat_pairs, queue, where, problems)
    return BrokerStats(used_memory=used, maxmemory=limit, tasks=tasks, workers=workers, problems=tuple(problems))


def parse_info_memory(text: bytes, *, where: str) -> tuple[int | None, int | None, list[str]]:
    """(used_memory, maxmemory, problems) from an INFO memory answer; a field missing or odd is None."""
    found: dict[bytes, bytes] = {}
    for match in _INFO_LINE.finditer(text[:MAX_INFO_BYTES]):
        found.setdefault(match.group(1), match.group(2).strip())
    values: list[int | None] = []
    problems = []
    for name in (b"used_memory", b"maxmemory"):
        raw = found.get(name)
        if raw is not None and _BYTES.fullmatch(raw):
            values.append(int(raw))
            continue
        values.append(None)
        what = "missing" if raw is None else f"not a byte count ({raw[:40]!r})"
        problems.append(f"INFO memory at {where}: {name.decode()} {what}")
    return values[0], values[1], problems


def _pairs(
    entry: Any, queue: str, kind: str, where: str, problems: list[tuple[str, str, str]]
) -> list[tuple[bytes, bytes]]:
    if isinstance(entry, list) and entry and entry[0] == b"ok" and len(entry) % 2 == 1:
        items = entry[1:]
        if all(isinstance(x, bytes) for x in items):
            return list(zip(items[0::2], items[1::2], strict=True))
    if isinstance(entry, list) and len(entry) == 3 and all(isinstance(x, bytes | int) for x in entry):
        problem, key, detail = (x.decode("utf-8", "backslashreplace") if isinstance(x, bytes) else x for x in entry)
        why = {
            "wrongtype": f"holds a {detail}, not a hash",
            "toomany": f"has {detail} fields, above {MAX_HASH_FIELDS}",
            "toolarge": f"takes {detail} bytes, above {MAX_HASH_BYTES}",
        }.get(str(problem), f"cannot be measured ({detail})")
        problems.append((queue, kind, f"Redis key {key!r} at {where} {why}: not read"))
        return []
    problems.append((queue, kind, f"queue {queue!r} at {where}: unexpected {kind} entry {entry!r:.100}"))
    return []


def _text(raw: bytes, limit: int) -> str | None:
    text = raw.decode("utf-8", "backslashreplace")
    return text if 0 < len(text) <= limit and text.isprintable() else None


def _task_counts(
    pairs: list[tuple[bytes, bytes]], queue: str, where: str, problems: list[tuple[str, str, str]]
) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    key = TASKS_KEY.format(queue=queue)
    for field, value in pairs:
        state, _, raw_name = field.partition(b":")
        name = _text(raw_name, MAX_NAME_CHARS)
        if state.decode("ascii", "replace") not in TASK_STATES or name is None:
            problems.append((queue, "task_counts", f"{key} at {where}: field {field[:80]!r} is not "
                             f"'succeeded:<task>' or 'failed:<task>' (task names up to {MAX_NAME_CHARS} chars)"))
        elif not _COUNT.fullmatch(value):
            problems.append((queue, "task_counts", f"{key} at {where}: field {field[:80]!r} holds "
                             f"{value[:40]!r}, not a count of 0..15 digits"))
        else:
            counts[(state.decode(), name)] = int(value)
    return counts


def _worker_beats(
    pairs: list[tuple[bytes, bytes]], queue: str, where: str, problems: list[tuple[str, str, str]]
) -> dict[str, WorkerBeat]:
    beats: dict[str, WorkerBeat] = {}
    key = WORKERS_KEY.format(queue=queue)
    for field, value in pairs:
        host = _text(field, MAX_HOST_CHARS)
        beat = _beat(value)
        if host is None or beat is None:
            problems.append((queue, "worker_beats", f"{key} at {where}: field {field[:80]!r} = {value[:80]!r} "
                             "is not '<host>' = '<time> <interval> <memory|-> <limit|->'"))
        else:
            beats[host] = beat
    return beats


def _beat(value: bytes) -> WorkerBeat | None:
    parts = value.split(b" ")
    if len(parts) != 4 or not _NUMBER.fullmatch(parts[0]) or not _NUMBER.fullmatch(parts[1]):
        return None
    at, every = float(parts[0]), float(parts[1])
    if not (math.isfinite(at) and 0.1 <= every <= MAX_INTERVAL_S):
        return None
    sizes = [None if p == b"-" else int(p) if _BYTES.fullmatch(p) else -1 for p in parts[2:]]
    if -1 in sizes:
        return None
    return WorkerBeat(at=at, every=every, memory=sizes[0], limit=sizes[1])
