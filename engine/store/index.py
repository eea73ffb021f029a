"""The store index: which sessions the store holds, which blobs each references, and what to
evict and collect. Pure bookkeeping, no torch; the SessionStore moves the data.

Policy: the limits (sessions, bytes) apply to the store as a whole, counting each shared block
once. Eviction removes whole sessions, least recently used first; a blob that no manifest
references any more is an orphan, and orphans are collected.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..options import check_options, option

Ref = tuple[str, str]   # (kind, key) of a blob


@dataclass(frozen=True)
class SessionLimits:
    max_memory_sessions: int = option(256, "sessions whose state is cached in this process", unit="sessions",
                                      name="max_sessions_in_memory")
    max_memory_bytes: int = option(2 << 30, "bytes of that cache", unit="bytes", name="max_session_memory_bytes")
    max_store_sessions: int = option(100_000, "sessions in the session store, all replicas together (least "
                                     "recently used evicted)", unit="sessions", name="max_sessions_on_disk")
    max_store_bytes: int = option(64 << 30, "physical bytes in the session store (a shared block once)",
                                  unit="bytes", name="max_session_disk_bytes")

    def __post_init__(self) -> None:  # 0 is a limit too: nothing is kept there
        check_options(self, may_be_zero=tuple(f for f in self.__dataclass_fields__))


@dataclass
class SessionEntry:
    session_id: str
    num_tokens: int
    num_checkpoints: int
    nbytes: int                           # logical: what the session would take were nothing shared
    created: float
    last_used: float
    blocks: tuple[str, ...] = ()
    slot: str | None = None
    manifest_bytes: int = 0
    in_memory: bool = False               # set by the store when it lists

    @property
    def tier(self) -> str:
        return "memory" if self.in_memory else "store"

    def refs(self) -> list[Ref]:
        return [("block", k) for k in self.blocks] + ([("slot", self.slot)] if self.slot else [])


@dataclass
class StoreIndex:
    limits: SessionLimits
    entries: OrderedDict[str, SessionEntry] = field(default_factory=OrderedDict)  # LRU first
    blobs: dict[Ref, int] = field(default_factory=dict)                           # physical sizes
    refs: Counter = field(default_factory=Counter)

    # --- sessions --------------------------------------------------------------------------
    def get(self, session_id: str) -> SessionEntry | None:
        return self.entries.get(session_id)

    def add(self, entry: SessionEntry) -> None:
        """Record a session (replacing its previous version), most recently used."""
        self.remove(entry.session_id)
        self.entries[entry.session_id] = entry
        self.refs.update(entry.refs())

    def remove(self, session_id: str) -> SessionEntry | None:
        entry = self.entries.pop(session_id, None)
        if entry is not None:
            self.refs.subtract(entry.refs())
        return entry

    def touch(self, session_id: str, now: float) -> None:
        entry = self.entries.get(session_id)
        if entry is not None:
            entry.last_used = now
            self.entries.move_to_end(session_id)

    # --- blobs -----------------------------------------------------------------------------
    def add_blob(self, ref: Ref, size: int) -> None:
        self.blobs[ref] = size

    def drop_blob(self, ref: Ref) -> None:
        self.blobs.pop(ref, None)

    def has_blob(self, ref: Ref) -> bool:
        return ref in self.blobs

    def orphans(self) -> list[Ref]:
        return [ref for ref in self.blobs if self.refs[ref] <= 0]

    # --- totals ----------------------------------------------------------------------------
    @property
    def num_sessions(self) -> int:
        return len(self.entries)

    @property
    def physical_bytes(self) -> int:
        return sum(self.blobs.values()) + sum(e.manifest_bytes for e in self.entries.values())

    @property
    def logical_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def num_blobs(self, kind: str) -> int:
        return sum(1 for k, _ in self.blobs if k == kind)

    def over_limits(self) -> bool:
        return (self.num_sessions > self.limits.max_store_sessions
                or self.physical_bytes > self.limits.max_store_bytes)

    def victims(self, protected: Iterable[str] = ()) -> list[str]:
        """Sessions to evict, least recently used first, until the store is under its limits;
        a blob counts as freed once no remaining session references it."""
        protected = set(protected)
        count, size = self.num_sessions, self.physical_bytes - sum(self.blobs[r] for r in self.orphans())
        refs = Counter({r: n for r, n in self.refs.items() if n > 0})
        chosen = []
        for entry in self.entries.values():
            if count <= self.limits.max_store_sessions and size <= self.limits.max_store_bytes:
                break
            if entry.session_id in protected:
                continue
            chosen.append(entry.session_id)
            count -= 1
            size -= entry.manifest_bytes
            for ref in entry.refs():
                refs[ref] -= 1
                if refs[ref] == 0:
                    size -= self.blobs.get(ref, 0)
        return chosen

    def rebuild(self, entries: list[SessionEntry], blobs: dict[Ref, int]) -> None:
        """Start over from a scan of the store (startup, a collection). A session keeps the
        most recent use known, the scan's or this index's own."""
        known = {sid: e.last_used for sid, e in self.entries.items()}
        self.entries, self.blobs, self.refs = OrderedDict(), dict(blobs), Counter()
        for entry in entries:
            entry.last_used = max(entry.last_used, known.get(entry.session_id, entry.last_used))
        for entry in sorted(entries, key=lambda e: e.last_used):
            self.add(entry)
