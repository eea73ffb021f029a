"""The memory tier: recently used sessions' states kept in this process, in front of the store.
Pure bookkeeping over opaque values and their sizes (no torch).

Blocks are cached by key and shared, like the store's, so two cached sessions with a common
prefix hold its blocks once. Bounded by a session count and bytes; least recently used sessions
leave first, and a block goes with the last session that referenced it.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class CachedSession:
    digest: str          # of the manifest this state matches
    manifest: Any
    slot: Any            # None when the session has no usable slot
    slot_bytes: int


class MemoryTier:
    def __init__(self, max_sessions: int, max_bytes: int):
        self.max_sessions, self.max_bytes = max_sessions, max_bytes
        self.sessions: OrderedDict[str, CachedSession] = OrderedDict()   # LRU first
        self.blocks: dict[str, tuple[Any, int]] = {}
        self.refs: Counter = Counter()
        self.nbytes = 0
        self.evictions = 0

    def get(self, session_id: str) -> CachedSession | None:
        cached = self.sessions.get(session_id)
        if cached is not None:
            self.sessions.move_to_end(session_id)
        return cached

    def block(self, key: str) -> Any | None:
        item = self.blocks.get(key)
        return item[0] if item else None

    def put(self, session_id: str, cached: CachedSession, blocks: dict[str, tuple[Any, int]]) -> None:
        """Cache a session's state; `blocks` holds those of its blocks not cached yet."""
        for key, item in blocks.items():
            if key not in self.blocks:
                self.blocks[key] = item
                self.nbytes += item[1]
        self.refs.update(cached.manifest.blocks)  # before dropping the old version, which shares most
        self.drop(session_id)
        self.sessions[session_id] = cached
        self.nbytes += cached.slot_bytes
        self._release_unreferenced(blocks)
        self._evict(keep=session_id)

    def drop(self, session_id: str) -> None:
        cached = self.sessions.pop(session_id, None)
        if cached is None:
            return
        self.nbytes -= cached.slot_bytes
        self.refs.subtract(cached.manifest.blocks)
        self._release_unreferenced(cached.manifest.blocks)

    def _release_unreferenced(self, keys) -> None:
        for key in keys:
            if self.refs[key] <= 0 and key in self.blocks:
                self.nbytes -= self.blocks.pop(key)[1]
                del self.refs[key]

    def _evict(self, keep: str) -> None:
        while len(self.sessions) > self.max_sessions or self.nbytes > self.max_bytes:
            victim = next((sid for sid in self.sessions if sid != keep), None)
            if victim is None:
                return
            self.drop(victim)
            self.evictions += 1
