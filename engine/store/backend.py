"""The session store's backends: where blocks, slots, manifests and leases live.

One small interface, three implementations: memory (this process only), a local directory
(`file_backend.py`) and Redis (`redis_backend.py`, shared by any number of replicas). Values are
opaque bytes under (kind, key); the SessionStore decides what they mean. Kinds: "block", "slot",
"manifest", "response".

Durability: `put` and `put_new` replace or create a value atomically (a reader sees the old
value or the new one, never a mix); after `barrier()` returns, every value put before it is on
stable storage (fsync'd, or acknowledged by the server).

Leases: `acquire_lease(name, owner, ttl_s)` takes a lease that expires `ttl_s` after its last
renewal unless released; it fails while another owner holds it. `renew_lease` extends a lease
only while its owner still holds it, and `put_fenced` writes only while a given lease is held by
a given owner, in one atomic step: an owner whose lease ran out and was taken by another can
never overwrite what the other wrote. A crashed owner's leases run out by themselves.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

KINDS = ("block", "slot", "manifest", "response")


class BackendError(OSError):
    """The backend cannot be reached or refused an operation."""


@dataclass(frozen=True)
class Stat:
    size: int
    age_s: float   # seconds since it was written or last touched


class StoreBackend(ABC):
    name = "abstract"
    shared = False     # may other processes write the same store concurrently?

    @abstractmethod
    def get(self, kind: str, key: str) -> bytes | None: ...

    @abstractmethod
    def put(self, kind: str, key: str, data: bytes) -> None:
        """Create or replace, atomically."""

    @abstractmethod
    def put_new(self, kind: str, key: str, data: bytes) -> bool:
        """Create unless present (content-addressed values: the first writer wins); True if written."""

    @abstractmethod
    def touch(self, kind: str, key: str) -> bool:
        """Whether the value exists; marks it recently used, so a collection spares it for a while."""

    @abstractmethod
    def delete(self, kind: str, key: str) -> None: ...

    @abstractmethod
    def delete_if_idle(self, kind: str, key: str, min_age_s: float) -> bool:
        """Delete unless written or touched in the last `min_age_s` seconds, atomically where the
        backend can (a collection must not delete a blob another replica has just touched)."""

    @abstractmethod
    def list(self, kind: str) -> dict[str, Stat]: ...

    def barrier(self) -> None:
        """Everything put so far is on stable storage when this returns."""

    @abstractmethod
    def acquire_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take the lease if nobody holds it (or it expired), or renew it if `owner` does."""

    @abstractmethod
    def renew_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Extend the lease if `owner` still holds it; False if it is lost (expired, or taken)."""

    @abstractmethod
    def put_fenced(self, kind: str, key: str, data: bytes, lease: str, owner: str) -> bool:
        """`put`, only if `owner` holds lease `lease` now (checked and written atomically)."""

    @abstractmethod
    def release_lease(self, name: str, owner: str) -> None:
        """Drop the lease if `owner` holds it (a compare-and-delete)."""

    @abstractmethod
    def lease_owner(self, name: str) -> str | None:
        """Who holds the lease now (None: nobody, or it expired)."""

    def close(self) -> None:
        pass


class MemoryBackend(StoreBackend):
    """This process only: sessions live as long as the server (no `--session-store`)."""

    name = "memory"

    def __init__(self):
        self.values: dict[tuple[str, str], tuple[bytes, float]] = {}
        self.leases: dict[str, tuple[str, float]] = {}
        self.lock = threading.Lock()

    def get(self, kind, key):
        item = self.values.get((kind, key))
        return item[0] if item else None

    def put(self, kind, key, data):
        self.values[(kind, key)] = (bytes(data), time.monotonic())

    def put_new(self, kind, key, data):
        with self.lock:
            if (kind, key) in self.values:
                return False
            self.put(kind, key, data)
            return True

    def touch(self, kind, key):
        with self.lock:
            item = self.values.get((kind, key))
            if item is not None:
                self.values[(kind, key)] = (item[0], time.monotonic())
            return item is not None

    def delete(self, kind, key):
        self.values.pop((kind, key), None)

    def delete_if_idle(self, kind, key, min_age_s):
        with self.lock:
            item = self.values.get((kind, key))
            if item is None or time.monotonic() - item[1] < min_age_s:
                return False
            del self.values[(kind, key)]
            return True

    def list(self, kind):
        now = time.monotonic()
        return {k: Stat(len(v), now - t) for (c, k), (v, t) in list(self.values.items()) if c == kind}

    def acquire_lease(self, name, owner, ttl_s):
        with self.lock:
            held = self.leases.get(name)
            if held is not None and held[0] != owner and held[1] > time.monotonic():
                return False
            self.leases[name] = (owner, time.monotonic() + ttl_s)
            return True

    def renew_lease(self, name, owner, ttl_s):
        with self.lock:
            if not self._holds(name, owner):
                return False
            self.leases[name] = (owner, time.monotonic() + ttl_s)
            return True

    def put_fenced(self, kind, key, data, lease, owner):
        with self.lock:
            if not self._holds(lease, owner):
                return False
            self.put(kind, key, data)
            return True

    def release_lease(self, name, owner):
        with self.lock:
            if self.leases.get(name, ("",))[0] == owner:
                del self.leases[name]

    def lease_owner(self, name):
        held = self.leases.get(name)
        return held[0] if held is not None and held[1] > time.monotonic() else None

    def _holds(self, name: str, owner: str) -> bool:
        return self.lease_owner(name) == owner


def mask_password(url: str) -> str:
    """A store url as it may be shown (logs, errors, /health): without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def open_backend(spec: str) -> StoreBackend:
    """A backend from `--session-store`: "" (memory), a directory or file://DIR, or
    redis://HOST:PORT/DB. Raises BackendError if it cannot be opened."""
    if not spec:
        return MemoryBackend()
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from .redis_backend import RedisBackend
        return RedisBackend(spec)
    if "://" in spec and not spec.startswith("file://"):
        raise BackendError(f"session store {mask_password(spec)!r}: use a directory, file://DIR or redis://HOST:PORT/DB")
    from .file_backend import FileBackend
    return FileBackend(spec.removeprefix("file://"))
