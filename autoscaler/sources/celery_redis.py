"""The Celery-on-Redis metric source: waiting, unacked and latency of every queue in one round trip.

It reads kombu's Redis transport storage directly, with one Lua script per tick (`celery_redis.lua`):

* waiting = LLEN summed over the queue's list and its priority sub-lists (kombu rounds a message's
  priority down to a step of `priority_steps` and keeps step `s` in ``queue + sep + str(s)``, step 0 in
  the bare ``queue`` key; every key carries the `global_keyprefix`);
* unacked = entries of kombu's unacked hash (prefetched, reserved, or running under acks_late),
  attributed to a queue by the routing key kombu stores with each entry; that is the queue name under
  Celery's default direct routing, so custom exchanges routing by other keys are not attributed;
* latency = now - the publish stamp (`autoscaler.celery`) of the oldest waiting message.

Malformed or hostile data, decided once here, never failing the whole read (any broker client can write
these keys): a key of the wrong Redis type under a queue name makes that queue unreadable
(`QueueStats.error` names the key and its type: only the pools using that queue hold); a wrong-typed
unacked key makes only `unacked` unknown (`unacked_error`: pools on waiting_unacked hold). Unparsable
entries in the unacked hash are skipped and logged as a warning with their count: one bad entry must not
stop scaling. An oldest message without a (numeric) stamp makes that queue's latency unknown (None), never 0.

What one read copies inside Redis is bounded (issue 17, item 5). No Redis command gives a list element's or
a hash field name's size without copying it, so the script asks MEMORY USAGE first: a list's oldest message
is copied for its stamp only when the whole list is at most `stamp_list_bytes`, or at most
`stamp_entry_bytes` per message on average; else that queue's latency is unknown and `latency_error` says
"oldest message too large to read". Unacked field names and values are copied within `broker.unacked_bytes`
(see the script for the exact bound).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from loguru import logger
from redis.backoff import NoBackoff
from redis.retry import Retry
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from autoscaler.celery import PUBLISHED_AT_HEADER
from autoscaler.policy.model import BrokerOptions
from autoscaler.sources.base import SourceError
from autoscaler.types import QueueStats

__all__ = [
    "DEFAULT_ATTEMPTS",
    "DEFAULT_BACKOFF_INITIAL_S",
    "DEFAULT_BACKOFF_MAX_S",
    "DEFAULT_RETRY_BUDGET_S",
    "DEFAULT_TIMEOUT_S",
    "NON_RETRYABLE_ERRORS",
    "RETRYABLE_ERRORS",
    "CeleryRedisSource",
    "redact_url",
]

# Socket connect and read timeout: a tick must not hang on a dead or black-holed broker.
DEFAULT_TIMEOUT_S = 2.0
# Tries per observe() (the first included), with exponential backoff plus jitter between them.
DEFAULT_ATTEMPTS = 3
DEFAULT_BACKOFF_INITIAL_S = 0.1
DEFAULT_BACKOFF_MAX_S = 1.0
# No new try starts after this long; worst case per tick is this plus one timed-out try.
DEFAULT_RETRY_BUDGET_S = 4.0
# A list's oldest message is copied (for its publish stamp) only if the whole list takes at most this many
# bytes, or at most DEFAULT_STAMP_ENTRY_BYTES per message on average. Copying costs Redis about 1 ms per MB
# (reply buffer, Lua string, stamp search): 1 MiB keeps a read of a few such lists within ~5 ms, and a
# Celery message averaging above 64 KiB is far from the usual 1-10 KB.
DEFAULT_STAMP_LIST_BYTES = 1 << 20
DEFAULT_STAMP_ENTRY_BYTES = 64 << 10

# Transient: the broker restarts, fails over, or the network blips.
RETRYABLE_ERRORS: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)
# ConnectionError subclasses that retrying cannot fix: a wrong password stays wrong.
NON_RETRYABLE_ERRORS: tuple[type[Exception], ...] = (redis.AuthenticationError,)

_SCRIPT_RESOURCE = "celery_redis.lua"
_REDACTED = "***"
_HEADER_FIELDS = 6  # "ok", hlen, read, unparsed, bytes copied, unacked problem
_QUEUE_FIELDS = 4  # waiting, unacked in read, oldest stamp, problem


def redact_url(url: str) -> str:
    """`url` with any password (in the userinfo or a `password=` query parameter) replaced by ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{_REDACTED}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, _REDACTED if k.lower() == "password" else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _describe_client(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, RETRYABLE_ERRORS) and not isinstance(exc, NON_RETRYABLE_ERRORS)


def _text(value: object) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class _Plan:
    """The script's KEYS and ARGV for one list of queues, kept while the policy's queues stay the same."""

    queues: tuple[str, ...]
    keys: list[str]
    args: list[str | int]
    key_queue: dict[str, str]  # list key -> queue name, to name the queue in errors


class CeleryRedisSource:
    """Reads Celery queue stats from kombu's Redis transport; implements `MetricSource`.

    Give `url` (redis://, rediss:// for TLS, with password and db index) or a ready `client`; an
    injected client is used as configured (its own retry settings included) and is not closed by
    `close()`. With both, `url` only names the broker in messages.
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        broker: BrokerOptions,
        client: redis.Redis | None = None,
        clock: Callable[[], float] = time.time,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff_initial_s: float = DEFAULT_BACKOFF_INITIAL_S,
        backoff_max_s: float = DEFAULT_BACKOFF_MAX_S,
        retry_budget_s: float = DEFAULT_RETRY_BUDGET_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        stamp_list_bytes: int = DEFAULT_STAMP_LIST_BYTES,
        stamp_entry_bytes: int = DEFAULT_STAMP_ENTRY_BYTES,
    ) -> None:
        if client is None and url is None:
            raise ValueError("CeleryRedisSource needs a `url` or a `client`")
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {attempts}")
        self._broker = broker
        self._clock = clock
        self._owns_client = client is None
        self._client = client if client is not None else self.connect(url or "", timeout_s)
        self._where = redact_url(url) if url is not None else _describe_client(self._client)
        self._script = self._client.register_script(
            resources.files("autoscaler.sources").joinpath(_SCRIPT_RESOURCE).read_text(encoding="utf-8")
        )
        self._retrying = Retrying(
            stop=stop_after_attempt(attempts) | stop_after_delay(retry_budget_s),
            # Exponential plus additive jitter, spelled with waits every supported tenacity has
            # (wait_exponential_jitter's arguments changed across versions).
            wait=wait_exponential(multiplier=backoff_initial_s, max=backoff_max_s)
            + wait_random(0, backoff_initial_s),
            retry=retry_if_exception(_is_retryable),
            before_sleep=self._log_retry,
            reraise=True,
        )
        self._plan: _Plan | None = None
        self._stamp_bytes = (stamp_list_bytes, stamp_entry_bytes)
        # Bytes of messages, field names and values the last read copied inside Redis (for tests and benches).
        self.last_copied_bytes = 0
        self._warned: set[str] = set()  # problems already logged, so a lasting one is logged once

    @staticmethod
    def connect(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> redis.Redis:
        # redis-py's own retries (on by default since 6.0, with backoff up to 10 s) would multiply
        # with ours and break the bound on a tick; tenacity alone decides.
        return redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )

    def observe(self, queues: Sequence[str]) -> dict[str, QueueStats]:
        """Stats for every queue in `queues`, read with one EVALSHA; raises SourceError.

        `unacked` is exact while kombu's unacked hash holds at most `broker.unacked_sample` entries and
        `broker.unacked_bytes` bytes; above that it is an estimate scaled up from the entries read (a
        bounded sample: a read never copies more than that many entries or bytes inside Redis).
        """
        names = tuple(dict.fromkeys(queues))
        if not names:
            return {}
        plan = self._plan_for(names)
        reply = self._run(plan)
        now = self._clock()
        return self._parse(plan, reply, now)

    def reconfigure(self, broker: BrokerOptions) -> None:
        """Read with `broker`'s key prefix, priority steps, separator and unacked key from the next call on
        (a reloaded policy may change them)."""
        if broker != self._broker:
            self._broker = broker
            self._plan = None

    def close(self) -> None:
        """Release the connection pool, if this source created it."""
        if self._owns_client:
            self._client.close()

    def _plan_for(self, names: tuple[str, ...]) -> _Plan:
        if self._plan is not None and self._plan.queues == names:
            return self._plan
        b = self._broker
        # kombu's _q_for_pri: step 0 is the bare queue key, any other step the suffixed key.
        suffixes = ["" if step == 0 else f"{b.separator}{step}" for step in b.priority_steps]
        keys = [b.key_prefix + b.unacked_key]
        key_queue: dict[str, str] = {}
        for name in names:
            for suffix in suffixes:
                key = f"{b.key_prefix}{name}{suffix}"
                keys.append(key)
                key_queue[key] = name
        # kombu writes the routing key with json.dumps (ASCII-escaped); compare in that form.
        escaped = [json.dumps(name)[1:-1] for name in names]
        args: list[str | int] = [
            len(suffixes), b.unacked_sample, json.dumps(PUBLISHED_AT_HEADER), b.unacked_bytes, *self._stamp_bytes,
            *escaped,
        ]
        self._plan = _Plan(queues=names, keys=keys, args=args, key_queue=key_queue)
        return self._plan

    def _run(self, plan: _Plan) -> list[Any]:
        try:
            reply = self._retrying(self._script, keys=plan.keys, args=plan.args, client=self._client)
        except NON_RETRYABLE_ERRORS as exc:
            raise SourceError(f"Redis at {self._where} refused the credentials: {exc}") from exc
        except RETRYABLE_ERRORS as exc:
            raise SourceError(
                f"cannot reach Redis at {self._where} after {self._attempts_made()} attempt(s): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        except redis.RedisError as exc:
            raise SourceError(
                f"Redis at {self._where} failed the queue read: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(reply, list) or not reply:
            raise SourceError(f"unexpected reply from the queue-read script at {self._where}: {reply!r:.200}")
        return reply

    def _attempts_made(self) -> int:
        stats = self._retrying.statistics
        return int(stats.get("attempt_number", 1))

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        logger.debug(
            "Redis at {} failed ({}); retry {} in {:.2f}s", self._where, exc, state.attempt_number, wait
        )

    def _parse(self, plan: _Plan, reply: list[Any], now: float) -> dict[str, QueueStats]:
        status = _text(reply[0])
        expected = _HEADER_FIELDS + _QUEUE_FIELDS * len(plan.queues)
        if status != "ok" or len(reply) != expected:
            raise SourceError(
                f"unexpected reply from the queue-read script at {self._where}: "
                f"status {status!r}, {len(reply)} fields where {expected} were expected"
            )
        hlen, read, unparsed, copied = (int(v) for v in reply[1:5])
        self.last_copied_bytes = copied
        if unparsed:
            logger.warning(
                "{} of {} entries read from the unacked hash {!r} at {} are not kombu entries; not counted",
                unparsed,
                read,
                self._broker.key_prefix + self._broker.unacked_key,
                self._where,
            )
        unacked_error = self._problem(plan, reply[5], "unacked")
        scale = hlen / read if read else 0.0
        stats: dict[str, QueueStats] = {}
        problems = [] if unacked_error is None else [unacked_error]
        for i, name in enumerate(plan.queues):
            at = _HEADER_FIELDS + i * _QUEUE_FIELDS
            waiting, unacked, stamp, problem = reply[at : at + _QUEUE_FIELDS]
            why = self._problem(plan, problem, "latency")
            if why is not None and _text(problem[0]) == "wrongtype":
                stats[name] = QueueStats(name, 0, 0, None, error=why, unacked_error=unacked_error)
            else:
                stats[name] = QueueStats(
                    name=name,
                    waiting=int(waiting),
                    unacked=round(int(unacked) * scale),
                    latency_s=_latency(int(waiting), stamp, now),
                    unacked_error=unacked_error,
                    latency_error=why,
                )
            if why is not None:
                problems.append(why)
        self._warn_once(problems)
        return stats

    def _problem(self, plan: _Plan, problem: Any, what: str) -> str | None:
        """The script's {kind, key, ...} for one key as a sentence naming the key, or None for no problem."""
        if not isinstance(problem, list) or len(problem) < 3:
            return None
        kind, key = _text(problem[0]), _text(problem[1])
        queue = plan.key_queue.get(key)
        role = f"the key of queue {queue!r}" if queue is not None else "the unacked hash (broker.unacked_key)"
        expected = "list" if queue is not None else "hash"
        if kind == "wrongtype":
            unknown = f"queue {queue!r} cannot be read" if queue is not None else "unacked is unknown"
            return (
                f"Redis key {key!r} at {self._where} holds a {_text(problem[2])}, not a {expected}: it is {role}, "
                f"which kombu keeps as a {expected}; something else wrote to it, and {unknown} until it is fixed"
            )
        if kind == "toolarge" and len(problem) >= 4:
            size, entries = int(problem[2]), int(problem[3])
            if what == "latency":
                return (
                    f"oldest message too large to read: Redis key {key!r} at {self._where} holds "
                    f"{size:,} bytes in {entries:,} message(s), above {self._stamp_bytes[0]:,} in all and "
                    f"{self._stamp_bytes[1]:,} per message on average"
                )
            return (
                f"unacked entries too large to sample: Redis key {key!r} at {self._where} holds {size:,} bytes "
                f"in {entries:,} entries, and broker.unacked_bytes is {self._broker.unacked_bytes:,}"
            )
        return f"cannot bound the size of Redis key {key!r} at {self._where} ({role}): MEMORY USAGE failed: " + (
            _text(problem[2])
        )

    def _warn_once(self, problems: list[str]) -> None:
        for problem in problems:
            if problem not in self._warned:
                logger.warning("queue read: {}", problem)
        self._warned = set(problems)


def _latency(waiting: int, stamp: object, now: float) -> float | None:
    """Age of the oldest message: 0.0 when empty, None when its stamp is missing or unreadable."""
    if waiting == 0:
        return 0.0
    if stamp is None:
        return None
    try:
        published = float(_text(stamp))
    except ValueError:
        return None
    # Any producer can write the stamp: "-1e400", "nan" or "inf" are unreadable, not an age to act on.
    if not math.isfinite(published) or not math.isfinite(now - published):
        return None
    # A producer clock ahead of ours would give a negative age; the message has waited ~0.
    return max(0.0, now - published)
