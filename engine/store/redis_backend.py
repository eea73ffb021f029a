"""A session store in Redis, shared by every replica that points at the same server.

Keys: `mcserve:<kind>:<key>` (strings) and `mcserve:lease:<session>` (owner, with a TTL). Each
kind also has two hashes, `mcserve:size:<kind>` and `mcserve:touched:<kind>` (the server's clock,
in ms, at the value's last write or touch): listing and the grace period of a collection read
those, never the values, so a scan does not make every blob look freshly used (reading a key
resets Redis's own idle time). A write is durable as far as the Redis server makes it (AOF with
`appendfsync always` for a turn that survives the Redis host too; see deploy/). Every write,
touch and delete, leases and the fenced manifest write are Lua scripts: one atomic step on the
server each, so a value and its size and time never disagree, and only a lease's owner can
extend it, drop it or write under it.
"""

from __future__ import annotations

import redis

from .backend import BackendError, Stat, StoreBackend, mask_password

# KEYS = value, size hash, touched hash; ARGV[1] = the key within the hashes.
NOW_MS = "local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
STAMP = "redis.call('HSET', KEYS[2], ARGV[1], string.len(ARGV[2])); redis.call('HSET', KEYS[3], ARGV[1], now)\n"
PUT = NOW_MS + "redis.call('SET', KEYS[1], ARGV[2])\n" + STAMP + "return 1"
PUT_NEW = NOW_MS + "if not redis.call('SET', KEYS[1], ARGV[2], 'NX') then return 0 end\n" + STAMP + "return 1"
TOUCH = NOW_MS + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then redis.call('HSET', KEYS[2], ARGV[1], redis.call('STRLEN', KEYS[1])) end
redis.call('HSET', KEYS[3], ARGV[1], now)
return 1"""
DELETE = "redis.call('DEL', KEYS[1]); redis.call('HDEL', KEYS[2], ARGV[1]); redis.call('HDEL', KEYS[3], ARGV[1]); return 1"
# A value never stamped (written before the hashes existed) counts as old.
DELETE_IF_IDLE = NOW_MS + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local touched = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if now - touched < tonumber(ARGV[2]) then return 0 end
""" + DELETE
# KEYS = lease, value, size hash, touched hash; ARGV = owner, key, data.
FENCED_PUT = NOW_MS + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[2], string.len(ARGV[3])); redis.call('HSET', KEYS[4], ARGV[2], now)
return 1"""
ACQUIRE = """
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
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisBackend(StoreBackend):
    name = "redis"
    shared = True

    def __init__(self, url: str, prefix: str = "mcserve", timeout_s: float = 10.0):
        self.url, self.prefix = mask_password(url), prefix  # the url is shown in errors: never its password
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
            self.client.ping()
        except (redis.RedisError, ValueError) as e:
            raise BackendError(f"session store {self.url}: {e}") from None
        script = self.client.register_script
        self._put, self._put_new, self._touch, self._delete = script(PUT), script(PUT_NEW), script(TOUCH), script(DELETE)
        self._delete_if_idle, self._fenced_put = script(DELETE_IF_IDLE), script(FENCED_PUT)
        self._acquire, self._extend, self._release = script(ACQUIRE), script(EXTEND), script(RELEASE)

    def _key(self, kind: str, key: str) -> str:
        return f"{self.prefix}:{kind}:{key}"

    def _value_keys(self, kind: str, key: str) -> list[str]:
        return [self._key(kind, key), f"{self.prefix}:size:{kind}", f"{self.prefix}:touched:{kind}"]

    def get(self, kind, key):
        return self._do(self.client.get, self._key(kind, key))

    def put(self, kind, key, data):
        self._do(self._put, keys=self._value_keys(kind, key), args=[key, data])

    def put_new(self, kind, key, data):
        return bool(self._do(self._put_new, keys=self._value_keys(kind, key), args=[key, data]))

    def touch(self, kind, key):
        return bool(self._do(self._touch, keys=self._value_keys(kind, key), args=[key]))

    def delete(self, kind, key):
        self._do(self._delete, keys=self._value_keys(kind, key), args=[key])

    def delete_if_idle(self, kind, key, min_age_s):
        return bool(self._do(self._delete_if_idle, keys=self._value_keys(kind, key),
                             args=[key, int(min_age_s * 1000)]))

    def list(self, kind):
        """Every value of `kind` (a SCAN, so values written before the hashes existed count
        too), with its size and age from the hashes; no value is read."""
        keys = self._do(lambda: list(self.client.scan_iter(match=self._key(kind, "*"), count=1000)))
        if not keys:
            return {}
        _, sizes_key, touched_key = self._value_keys(kind, "")
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(sizes_key)
        pipe.hgetall(touched_key)
        pipe.time()
        sizes, touched, (seconds, micros) = self._do(pipe.execute)
        now_ms = seconds * 1000 + micros // 1000
        start, found = len(self._key(kind, "")), {}
        for k in keys:
            name = k.decode()[start:]
            size = sizes.get(name.encode())
            if size is None:  # not stamped: written before the hashes existed
                size = self._do(self.client.strlen, k)
                if not size:
                    continue  # deleted since the scan
            stamp = touched.get(name.encode())
            age = (now_ms - int(stamp)) / 1000 if stamp is not None else float("inf")
            found[name] = Stat(int(size), max(0.0, age))
        return found

    def acquire_lease(self, name, owner, ttl_s):
        return bool(self._do(self._acquire, keys=[self._key("lease", name)], args=[owner, max(1, int(ttl_s * 1000))]))

    def renew_lease(self, name, owner, ttl_s):
        return bool(self._do(self._extend, keys=[self._key("lease", name)], args=[owner, max(1, int(ttl_s * 1000))]))

    def put_fenced(self, kind, key, data, lease, owner):
        return bool(self._do(self._fenced_put, keys=[self._key("lease", lease), *self._value_keys(kind, key)],
                             args=[owner, key, data]))

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
