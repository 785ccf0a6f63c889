"""Leader election in Redis: set-if-absent with expiry, renewed each tick, so two controller replicas
never both act. A standby polls faster than the leader renews and takes over once the lock expires."""

from __future__ import annotations

import redis

__all__ = ["LeaderLock"]

# Renew only if we still hold it: a lock that expired and was taken by another replica must not be
# extended by the old holder.
_ACQUIRE_OR_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
-- Held by another name. A lease never outlives two of ours from the moment we see it: a lock written
-- without an expiry (by hand, or by a broker client when the lock shares the broker) expires.
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -1 or ttl > 2 * tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaderLock:
    def __init__(self, client: redis.Redis, *, key: str, instance_id: str, ttl: float) -> None:
        self._client = client
        self.key = key
        self.instance_id = instance_id
        self.ttl = ttl
        self._acquire = client.register_script(_ACQUIRE_OR_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire_or_renew(self) -> bool:
        """True if this instance holds the lock for another `ttl` seconds. Raises redis errors."""
        held = self._acquire(keys=[self.key], args=[self.instance_id, max(1, int(self.ttl * 1000))])
        return bool(held)

    def release(self) -> None:
        """Give the lock up (on a clean stop) so a standby takes over at its next poll."""
        self._release(keys=[self.key], args=[self.instance_id])

    def holder(self) -> str | None:
        value = self._client.get(self.key)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)
