"""The sessions index: which sessions exist, where (memory, disk), how big, and which to evict.
Pure bookkeeping, no torch; the SessionStore moves the data.

Policy: memory is an LRU cache of recently used sessions, bounded by count and bytes; disk holds
every saved session (write-through), bounded by count and bytes, evicting least recently used.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass

SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class SessionError(ValueError):
    """A session request cannot be served; `code` says why (for HTTP status mapping)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code  # invalid_id, not_found, busy, corrupt, wrong_model


def check_session_id(session_id: str) -> str:
    if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
        raise SessionError("session id must be 1-128 characters of letters, digits and _ . : - "
                           "(starting with a letter or digit)", "invalid_id")
    return session_id


@dataclass
class SessionEntry:
    session_id: str
    num_tokens: int
    num_checkpoints: int
    nbytes: int
    created: float
    last_used: float
    in_memory: bool = False
    on_disk: bool = False

    @property
    def tier(self) -> str:
        return "memory" if self.in_memory else "disk"


@dataclass(frozen=True)
class SessionLimits:
    max_memory_sessions: int = 256
    max_memory_bytes: int = 2 << 30
    max_disk_sessions: int = 100_000
    max_disk_bytes: int = 64 << 30


class SessionIndex:
    def __init__(self, limits: SessionLimits):
        self.limits = limits
        self.entries: OrderedDict[str, SessionEntry] = OrderedDict()  # least recently used first
        self.evictions = {"memory": 0, "disk": 0}

    def touch(self, entry: SessionEntry) -> None:
        entry.last_used = time.time()
        self.entries[entry.session_id] = entry
        self.entries.move_to_end(entry.session_id)

    def get(self, session_id: str) -> SessionEntry | None:
        return self.entries.get(session_id)

    def remove(self, session_id: str) -> SessionEntry | None:
        return self.entries.pop(session_id, None)

    def count(self, tier: str) -> int:
        return sum(1 for e in self.entries.values() if self._in(e, tier))

    def nbytes(self, tier: str) -> int:
        return sum(e.nbytes for e in self.entries.values() if self._in(e, tier))

    def memory_victims(self, keep: str | None = None) -> list[str]:
        """Sessions to drop from memory (LRU first) to get back under the memory limits."""
        return self._victims("memory", self.limits.max_memory_sessions, self.limits.max_memory_bytes, keep)

    def disk_victims(self, keep: str | None = None) -> list[str]:
        return self._victims("disk", self.limits.max_disk_sessions, self.limits.max_disk_bytes, keep)

    def _victims(self, tier: str, max_count: int, max_bytes: int, keep: str | None) -> list[str]:
        count, size = self.count(tier), self.nbytes(tier)
        victims = []
        for entry in self.entries.values():
            if count <= max_count and size <= max_bytes:
                break
            if self._in(entry, tier) and entry.session_id != keep:
                victims.append(entry.session_id)
                count, size = count - 1, size - entry.nbytes
        return victims

    @staticmethod
    def _in(entry: SessionEntry, tier: str) -> bool:
        return entry.in_memory if tier == "memory" else entry.on_disk
