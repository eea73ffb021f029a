"""A session store in Redis, shared by every replica that points at the same server.

Keys: `mcserve:<kind>:<key>` (strings) and `mcserve:lease:<session>` (owner, with a TTL). A
write is durable as far as the Redis server makes it (AOF with `appendfsync always` for a
turn that survives the Redis host too; see deploy/). Leases are keys with a TTL; taking,
renewing, releasing and the fenced manifest write are Lua scripts, so each is one atomic step
on the server and only a lease's owner can extend it, drop it or write under it.
"""

from __future__ import annotations

import math

import redis

from .backend import BackendError, Stat, StoreBackend

RENEW = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
FENCED_SET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2])
  return 1
end
return 0
"""
DELETE_IF_IDLE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('OBJECT', 'IDLETIME', KEYS[1]) < tonumber(ARGV[1]) then return 0 end
return redis.call('DEL', KEYS[1])
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisBackend(StoreBackend):
    name = "redis"
    shared = True

    def __init__(self, url: str, prefix: str = "mcserve", timeout_s: float = 10.0):
        self.url, self.prefix = url, prefix
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
            self.client.ping()
        except (redis.RedisError, ValueError) as e:
            raise BackendError(f"session store {url}: {e}") from None
        self._renew = self.client.register_script(RENEW)
        self._release = self.client.register_script(RELEASE)
        self._extend = self.client.register_script(EXTEND)
        self._fenced_set = self.client.register_script(FENCED_SET)
        self._delete_if_idle = self.client.register_script(DELETE_IF_IDLE)

    def _key(self, kind: str, key: str) -> str:
        return f"{self.prefix}:{kind}:{key}"

    def get(self, kind, key):
        return self._do(self.client.get, self._key(kind, key))

    def put(self, kind, key, data):
        self._do(self.client.set, self._key(kind, key), data)

    def put_new(self, kind, key, data):
        return bool(self._do(self.client.set, self._key(kind, key), data, nx=True))

    def touch(self, kind, key):
        return bool(self._do(self.client.touch, self._key(kind, key)))

    def delete(self, kind, key):
        self._do(self.client.delete, self._key(kind, key))

    def delete_if_idle(self, kind, key, min_age_s):
        return bool(self._do(self._delete_if_idle, keys=[self._key(kind, key)], args=[math.ceil(min_age_s)]))

    def list(self, kind):
        keys = self._do(lambda: list(self.client.scan_iter(match=self._key(kind, "*"), count=1000)))
        if not keys:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.object("idletime", k)  # first: STRLEN counts as an access and would reset it
            pipe.strlen(k)
        replies = self._do(pipe.execute, raise_on_error=False)
        start = len(self._key(kind, ""))
        found = {}
        for i, k in enumerate(keys):
            idle, size = replies[2 * i], replies[2 * i + 1]
            if isinstance(size, int) and size > 0:  # 0: deleted since the scan
                found[k.decode()[start:]] = Stat(size, float(idle) if isinstance(idle, int) else 0.0)
        return found

    def acquire_lease(self, name, owner, ttl_s):
        return bool(self._do(self._renew, keys=[self._key("lease", name)], args=[owner, max(1, int(ttl_s * 1000))]))

    def renew_lease(self, name, owner, ttl_s):
        return bool(self._do(self._extend, keys=[self._key("lease", name)], args=[owner, max(1, int(ttl_s * 1000))]))

    def put_fenced(self, kind, key, data, lease, owner):
        return bool(self._do(self._fenced_set, keys=[self._key("lease", lease), self._key(kind, key)],
                             args=[owner, data]))

    def release_lease(self, name, owner):
        self._do(self._release, keys=[self._key("lease", name)], args=[owner])

    def lease_owner(self, name):
        owner = self._do(self.client.get, self._key("lease", name))
        return owner.decode() if owner is not None else None

    def close(self):
        self.client.close()

    def _do(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as e:
            raise BackendError(f"session store {self.url}: {e}") from None
