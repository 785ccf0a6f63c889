"""Per-pool state in Redis, so a restarted or newly elected controller keeps every cooldown and window."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import cast

import redis
from loguru import logger

from autoscaler.types import PoolState

__all__ = ["MemoryStateStore", "RedisStateStore", "StateFencedError", "StateStoreError"]

# The write and the lease check in one step: a leader that lost its lock between its last check and this
# write (paused, partitioned) cannot overwrite the new leader's state.
_SAVE_IF_LEADER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i])
end
return 1
"""


class StateStoreError(Exception):
    """Pool state could not be read or written; the loop does not act on state it could not read."""


class StateFencedError(StateStoreError):
    """Not written: this replica no longer holds the leader lock."""


class RedisStateStore:
    """One JSON document per pool under `{prefix}state:{pool}`; read once when leadership starts,
    written in one pipeline at the end of each tick."""

    def __init__(
        self, client: redis.Redis, *, prefix: str = "autoscaler:", lease: tuple[str, str] | None = None
    ) -> None:
        """`lease` = (lock key, this replica's id): writes happen only while that lock is this replica's."""
        self._client = client
        self._prefix = prefix
        self._lease = lease
        self._save_if_leader = client.register_script(_SAVE_IF_LEADER)

    def key(self, pool: str) -> str:
        return f"{self._prefix}state:{pool}"

    def load(self, pools: Iterable[str]) -> dict[str, PoolState]:
        """Stored state per pool; a missing or malformed record starts fresh (and says so)."""
        names = list(pools)
        if not names:
            return {}
        try:
            # redis-py types its sync and async clients together; this one is sync.
            raw = cast(list[bytes | None], self._client.mget([self.key(n) for n in names]))
        except redis.RedisError as exc:
            raise StateStoreError(f"cannot read pool state from Redis: {exc}") from exc
        states: dict[str, PoolState] = {}
        for name, value in zip(names, raw, strict=True):
            if value is None:
                states[name] = PoolState()
                continue
            try:
                states[name] = PoolState.from_json(value)
            except (ValueError, TypeError, KeyError) as exc:
                logger.warning(
                    "pool {}: stored state at {} is malformed ({}); starting it fresh", name, self.key(name), exc
                )
                states[name] = PoolState()
        return states

    def save(self, states: Mapping[str, PoolState]) -> None:
        if not states:
            return
        if self._lease is not None:
            lock_key, instance_id = self._lease
            names = list(states)
            try:
                written = self._save_if_leader(
                    keys=[lock_key, *(self.key(n) for n in names)],
                    args=[instance_id, *(states[n].to_json() for n in names)],
                )
            except redis.RedisError as exc:
                raise StateStoreError(f"cannot write pool state to Redis: {exc}") from exc
            if not written:
                raise StateFencedError("pool state not written: this replica no longer holds the leader lock")
            return
        pipe = self._client.pipeline(transaction=False)
        for name, state in states.items():
            pipe.set(self.key(name), state.to_json())
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise StateStoreError(f"cannot write pool state to Redis: {exc}") from exc


class MemoryStateStore:
    """State kept in this process only: for the simulator, which replays on simulated time."""

    def __init__(self) -> None:
        self.states: dict[str, PoolState] = {}

    def load(self, pools: Iterable[str]) -> dict[str, PoolState]:
        return {name: self.states.get(name, PoolState()) for name in pools}

    def save(self, states: Mapping[str, PoolState]) -> None:
        self.states.update(states)
