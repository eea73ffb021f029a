"""SessionStore: named, saved sequence states that resume across requests, restarts and replicas.

The store is paged, like the device pool. Each checkpoint block is stored once, under a key made
of the model fingerprint, the checkpoint dtype and the chain hash of the tokens it covers (the
device prefix cache's hash), so sessions that share a prefix share its blocks. A session is a
manifest (engine/store/codec.py): its tokens, its ordered block keys and the key of its online
slot. A turn writes its new blocks, its slot, then its manifest, which replaces the old one
atomically; nothing else is rewritten.

Durability: `put` returns a Future that completes once the blocks, slot and manifest are on
stable storage (the backend's `barrier`). With durability "sync" the engine holds a turn's last
output until then; with "async" it does not wait (a crash can lose the turns whose writes had
not landed; the session then resumes from its last durable turn).

Exclusion: a session is advanced by one request at a time, across replicas: `acquire` takes the
session's lease in the store (SessionError "busy" if another holds it), and the write that
follows a turn releases it. Leases are renewed while held and expire if their owner dies. Each
tenure of a lease has its own holder id, and a manifest is written only while that very tenure
holds the lease (the backend's `put_fenced`): a replica that stalled past its lease's expiry
cannot overwrite the turn of the replica that took the session over.

Integrity: every blob and manifest is checksummed. A block that is missing or fails its checks
ends the session's usable prefix there: the session resumes from the last good checkpoint and
the rest of the prompt is read again. It is never a wrong answer, and it is counted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .session_index import SessionError, check_session_id
from .stats import StoreStatsSnapshot
from .store import legacy_v1
from .store.backend import BackendError, StoreBackend, open_backend
from .store.codec import IntegrityError, Manifest, decode_blob, encode_blob
from .store.index import SessionEntry, SessionLimits, StoreIndex
from .store.memory_tier import CachedSession, MemoryTier

log = logging.getLogger("mcserve.sessions")

DURABILITY = ("sync", "async")
WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Tensors = dict[str, torch.Tensor]


@dataclass
class SessionState:
    """What a resume installs: the first `len(blocks)` checkpoints (each {name: [L, ...]}) and,
    when the whole state is good, the online slot. `slot is None` means: restart from the last
    block and read the rest of `tokens` again."""

    tokens: list[int]
    blocks: list[Tensors]
    slot: Tensors | None
    fingerprint: str
    created: float = field(default_factory=time.time)

    @property
    def num_checkpoints(self) -> int:
        return len(self.blocks)


def stack_blocks(blocks: list[Tensors]) -> Tensors:
    """Blocks as the runner's pool takes them: {name: [L, n, ...]}."""
    return {name: torch.stack([b[name] for b in blocks], dim=1) for name in blocks[0]} if blocks else {}


def tensors_nbytes(tensors: Tensors | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values()) if tensors else 0


@dataclass
class StoreStats:
    """Counters for the metrics (read by the server's collector)."""

    writes: int = 0
    bytes_written: int = 0
    blocks_written: int = 0
    blocks_deduplicated: int = 0
    blocks_collected: int = 0
    slots_collected: int = 0
    evictions: Counter = field(default_factory=Counter)         # memory, store
    integrity_errors: Counter = field(default_factory=Counter)  # missing, truncated, checksum, ...
    unavailable_errors: int = 0      # request-time store calls that failed
    unavailable: str | None = None   # the last one's error, until a call succeeds again
    write_errors: int = 0
    failing_writes: int = 0  # write errors since the last write that landed: /health is degraded meanwhile
    recent_write_errors: deque = field(default_factory=lambda: deque(maxlen=8))  # for /health
    converted_v1: int = 0
    write_seconds: list[int] = field(default_factory=lambda: [0] * (len(WRITE_BUCKETS) + 1))
    write_seconds_sum: float = 0.0

    def observe_write(self, seconds: float) -> None:
        self.write_seconds[next((i for i, b in enumerate(WRITE_BUCKETS) if seconds <= b), len(WRITE_BUCKETS))] += 1
        self.write_seconds_sum += seconds


class StoreWriter:
    """One background thread that runs store writes in the order they were asked for; each
    job's Future completes when it has run."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="mcserve-session-writer", daemon=True)
        self.thread.start()

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self.jobs.put((future, fn, args))
        return future

    def flush(self) -> None:
        self.jobs.join()

    def _run(self) -> None:
        while True:
            future, fn, args = self.jobs.get()
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(e)
            finally:
                self.jobs.task_done()


class SessionStore:
    def __init__(self, fingerprint: str, backend: StoreBackend | str | Path | None = None,
                 limits: SessionLimits | None = None, *, ckpt_dtype: str = "fp32", durability: str = "sync",
                 lease_s: float = 30.0, gc_grace_s: float | None = None, owner: str | None = None):
        if durability not in DURABILITY:
            raise ValueError(f"session durability must be one of {list(DURABILITY)}, got {durability!r}")
        if lease_s <= 0:
            raise ValueError(f"session lease must be > 0 s, got {lease_s}")
        self.fingerprint, self.ckpt_dtype, self.durability = fingerprint, ckpt_dtype, durability
        self.segment_size = 0  # set by the engine (`attach`); only the v1 conversion needs it
        self.backend = backend if isinstance(backend, StoreBackend) else open_backend(str(backend or ""))
        self.limits = limits or SessionLimits()
        self.lease_s = lease_s
        # A blob another replica may be about to reference is spared this long after its last touch.
        self.gc_grace_s = gc_grace_s if gc_grace_s is not None else (60.0 if self.backend.shared else 0.0)
        self.owner = owner or lease_owner_id()
        LIVE_OWNERS.add(self.owner)
        self.index = StoreIndex(self.limits)
        self.memory = MemoryTier(self.limits.max_memory_sessions, self.limits.max_memory_bytes)
        self.stats = StoreStats()
        self.lock = threading.RLock()        # index, memory tier, holds, pending
        self.holds: Counter = Counter()      # session -> requests of this process holding its lease
        self.pending: Counter = Counter()    # session -> writes queued, not landed
        self.tenures: dict[str, str] = {}    # session -> the holder id of this process's lease on it
        self.pinned: Counter = Counter()     # block key -> queued writes that reference it
        self.evicting: set[str] = set()      # sessions this process is evicting (under its lease)
        self.prepinned: dict[str, list[str]] = {}  # session -> keys pinned by `unknown_blocks` for its put
        self.legacy: dict[str, dict[str, str]] = {}
        self._seen_damage: set[str] = set()
        self.writer = StoreWriter()
        self._closed = threading.Event()
        self._scan()
        self._collect(self.gc_grace_s)
        threading.Thread(target=self._renew_leases, name="mcserve-session-leases", daemon=True).start()

    def attach(self, fingerprint: str, ckpt_dtype: str, segment_size: int) -> None:
        """Called by the engine that saves into this store."""
        if fingerprint != self.fingerprint:
            raise ValueError(f"this session store is for model {self.fingerprint}, not {fingerprint}")
        self.ckpt_dtype, self.segment_size = ckpt_dtype, segment_size

    # --- keys ------------------------------------------------------------------------------
    def block_key(self, chain_hash: str) -> str:
        return f"{self.fingerprint[:16]}-{self.ckpt_dtype}-{chain_hash}"

    def unknown_blocks(self, session_id: str, keys: list[str]) -> list[int]:
        """Indices of `keys` this store does not know to hold: the blocks the coming `put` of
        `session_id` must be given. The others are pinned from now on, so that no collection
        deletes them before that put (or a `release`) ends it."""
        with self.lock:
            self._unpin(self.prepinned.pop(session_id, []))
            self.prepinned[session_id] = list(keys)
            self.pinned.update(keys)
            return [i for i, k in enumerate(keys) if not self.index.has_blob(("block", k))
                    and self.memory.block(k) is None]

    def _unpin(self, keys: list[str]) -> None:
        self.pinned.subtract(keys)
        self.pinned += Counter()  # drop the zeros

    # --- leases ----------------------------------------------------------------------------
    def acquire(self, session_id: str) -> None:
        """Take the session for one request of this process; SessionError "busy" if another
        replica holds it. Each acquire is ended by a `put` or a `release`."""
        check_session_id(session_id)
        with self.lock:
            if session_id in self.evicting:
                raise SessionError(f"session {session_id!r} is being evicted", "busy")
            if self.holds[session_id] == 0 and self.pending[session_id] == 0 and not self._take_lease(session_id):
                raise SessionError(f"session {session_id!r} is busy with a request on another replica", "busy")
            self.holds[session_id] += 1

    def _take_lease(self, session_id: str) -> bool:
        """Take the session's lease for a new tenure of this process (call under self.lock)."""
        tenure = f"{self.owner}/{secrets.token_hex(4)}"
        if not self._backend(self.backend.acquire_lease, session_id, tenure, self.lease_s):
            holder = self._backend(self.backend.lease_owner, session_id)
            if holder is None or not owner_is_dead(holder):
                return False
            log.info("session %r: breaking the lease of %s, a process of this host that is gone", session_id, holder)
            self._backend(self.backend.release_lease, session_id, holder)
            if not self._backend(self.backend.acquire_lease, session_id, tenure, self.lease_s):
                return False
        self.tenures[session_id] = tenure
        return True

    def release(self, session_id: str) -> None:
        """End an acquire that saves nothing (the lease goes once earlier writes have landed)."""
        with self.lock:
            self._unpin(self.prepinned.pop(session_id, []))
        self.writer.submit(self._drop_hold, session_id)

    def _drop_hold(self, session_id: str) -> None:
        with self.lock:
            self.holds[session_id] -= 1
            if self.holds[session_id] <= 0:
                del self.holds[session_id]
                if self.pending[session_id] <= 0 and session_id in self.tenures:
                    self.backend.release_lease(session_id, self.tenures.pop(session_id))

    def _renew_leases(self) -> None:
        while not self._closed.wait(self.lease_s / 3):
            with self.lock:
                held = set(self.holds) | {s for s, n in self.pending.items() if n > 0} | self.evicting
            for sid in held:
                try:
                    with self.lock:
                        tenure = self.tenures.get(sid)
                    if tenure is not None and not self.backend.renew_lease(sid, tenure, self.lease_s):
                        log.warning("lost the lease of session %r: its next write will be refused", sid)
                except Exception as e:  # noqa: BLE001 - the thread must live on: every held lease needs it
                    log.warning("could not renew the lease of session %r: %s", sid, e)

    # --- reads -----------------------------------------------------------------------------
    def get(self, session_id: str) -> SessionState | None:
        """The saved state (possibly a prefix of it, see SessionState), or None if there is no
        such session or nothing of it is usable. SessionError "wrong_model" if another model saved it."""
        check_session_id(session_id)
        with self.lock:
            cached = self.memory.get(session_id)
            pending = cached is not None and self.pending[session_id] > 0
        if pending:
            return self._state(cached.manifest, cached.slot, self._blocks_of(cached.manifest))
        data = self._backend(self.backend.get, "manifest", session_id)
        if data is None:
            return self._convert_v1(session_id)
        try:
            manifest = Manifest.decode(data, session_id)
        except IntegrityError as e:
            self._integrity_error(e)
            return None
        if manifest.fingerprint != self.fingerprint:
            raise SessionError(f"session {session_id!r} was saved by another model ({manifest.fingerprint}), "
                               f"not this one ({self.fingerprint})", "wrong_model")
        digest = _digest(data)
        self._backend(self.backend.touch, "manifest", session_id)  # its recency, for every replica's eviction
        with self.lock:
            cached = self.memory.get(session_id)
            hit = cached is not None and cached.digest == digest
            if hit:
                self.index.touch(session_id, time.time())
        if hit:
            return self._state(manifest, cached.slot, self._blocks_of(manifest))
        return self._load(manifest, digest, len(data))

    def prefetch(self, session_id: str) -> None:
        """Read a session into the memory tier ahead of `get`, outside the engine's lock, so that
        reading a long session from the store does not stall the engine's steps. Best effort:
        anything unusual (no session, damage, another model) is left for `get` to handle."""
        try:
            check_session_id(session_id)
            data = self.backend.get("manifest", session_id)
            manifest = Manifest.decode(data, session_id) if data is not None else None
            if manifest is None or manifest.fingerprint != self.fingerprint:
                return
            digest = _digest(data)
            with self.lock:
                cached = self.memory.get(session_id)
                if self.pending[session_id] > 0 or (cached is not None and cached.digest == digest):
                    return  # a write is queued: the memory tier holds a newer state than the store
            self._load(manifest, digest, len(data), strict=True)
        except (OSError, SessionError, IntegrityError):
            return

    def _load(self, manifest: Manifest, digest: str, manifest_bytes: int, strict: bool = False) -> SessionState:
        """Read a manifest's blocks and slot and cache them. A damaged blob ends the usable
        prefix there (counted), or with `strict` raises IntegrityError and caches nothing."""
        blocks, fresh = [], {}
        for key in manifest.blocks:
            with self.lock:
                tensors = self.memory.block(key)
            if tensors is None:
                tensors = self._read_block(key, manifest.session_id, strict)
                if tensors is None:
                    break
                fresh[key] = (tensors, tensors_nbytes(tensors))
            blocks.append(tensors)
        slot = None
        if len(blocks) == len(manifest.blocks) and manifest.slot is not None:
            try:
                slot = decode_blob(self._backend(self.backend.get, "slot", manifest.slot),
                                   {"kind": "slot", "key": manifest.slot})
            except IntegrityError as e:
                if strict:
                    raise
                self._integrity_error(e, manifest.session_id)
        with self.lock:
            if strict and self.pending[manifest.session_id] > 0:  # a prefetch overtaken by a write
                return self._state(manifest, slot, blocks)
            good = Manifest(**{**manifest.__dict__, "blocks": manifest.blocks[:len(blocks)]})
            self.memory.put(manifest.session_id, CachedSession(digest, good, slot, tensors_nbytes(slot)), fresh)
            self._index_manifest(manifest, manifest_bytes)
            self.index.touch(manifest.session_id, time.time())
        return self._state(manifest, slot, blocks)

    def _blocks_of(self, manifest: Manifest) -> list[Tensors]:
        """A cached manifest's blocks: from the memory tier, or from the store for those it does
        not hold (a block another session stored first is not given to `put` again, so it is
        cached only if that session still is). A damaged block ends the list there (counted)."""
        blocks = []
        for key in manifest.blocks:
            with self.lock:
                tensors = self.memory.block(key)
            if tensors is None and (tensors := self._read_block(key, manifest.session_id)) is None:
                break
            blocks.append(tensors)
        return blocks

    def _read_block(self, key: str, session_id: str, strict: bool = False) -> Tensors | None:
        """A block from the store; None if it is damaged or missing (counted), which ends the
        session's usable prefix there; with `strict`, IntegrityError instead."""
        try:
            return decode_blob(self._backend(self.backend.get, "block", key), {"kind": "block", "key": key})
        except IntegrityError as e:
            if strict:
                raise
            self._integrity_error(e, session_id)
            return None

    def _state(self, manifest: Manifest, slot: Tensors | None, blocks: list[Tensors]) -> SessionState:
        whole = len(blocks) == len(manifest.blocks)
        return SessionState(list(manifest.tokens), blocks, slot if whole else None, manifest.fingerprint,
                            manifest.created)

    # --- writes ----------------------------------------------------------------------------
    def put(self, session_id: str, tokens: list[int], block_keys: list[str], new_blocks: dict[str, Tensors],
            slot: Tensors | None, created: float | None = None) -> Future:
        """Save a session's state: its block keys in order, the tensors of those this store did
        not know (`unknown_blocks`), and its online slot. Ends one `acquire`. The Future
        completes once the state is durable (or fails with the write's error)."""
        check_session_id(session_id)
        now = time.time()
        with self.lock:
            old = self.index.get(session_id)
            created = created or (old.created if old else now)
            slot_key = f"{session_id}.{secrets.token_hex(8)}" if slot is not None else None
            manifest = Manifest(session_id, self.fingerprint, self.ckpt_dtype, list(tokens), list(block_keys),
                                slot_key, 0, created, now)
            manifest.logical_bytes = self._logical_bytes(manifest, new_blocks, slot)
            data = manifest.encode()
            self.memory.put(session_id, CachedSession(_digest(data), manifest, slot, tensors_nbytes(slot)),
                            {k: (v, tensors_nbytes(v)) for k, v in new_blocks.items()})
            if self.holds[session_id] == 0:  # a put without acquire (tests): take the lease now
                if session_id not in self.tenures and not self._take_lease(session_id):
                    raise SessionError(f"session {session_id!r} is busy with a request on another replica", "busy")
                self.holds[session_id] += 1
            self.pending[session_id] += 1
            self._unpin(self.prepinned.pop(session_id, []))
            self.pinned.update(manifest.blocks)  # a collection before this write lands must spare them
        return self.writer.submit(self._write, manifest, new_blocks, slot)

    def _logical_bytes(self, manifest: Manifest, new_blocks: dict[str, Tensors], slot: Tensors | None) -> int:
        per_block = next((tensors_nbytes(b) for b in new_blocks.values()), 0)
        if not per_block:
            first = self.memory.block(manifest.blocks[0]) if manifest.blocks else None
            per_block = tensors_nbytes(first)
        return per_block * len(manifest.blocks) + tensors_nbytes(slot) + 4 * len(manifest.tokens)

    def _write(self, manifest: Manifest, new_blocks: dict[str, Tensors], slot: Tensors | None) -> SessionEntry:
        pinned = list(manifest.blocks)  # what `put` pinned; the manifest below may be cut
        manifest = Manifest(**{**manifest.__dict__, "blocks": list(manifest.blocks)})  # the memory tier's stays whole
        sid, started = manifest.session_id, time.monotonic()
        try:
            with self.lock:
                previous = self.index.get(sid)
            known = set(previous.blocks) if previous else set()
            for i, key in enumerate(manifest.blocks):
                if key in known:
                    continue  # referenced by the manifest being replaced: cannot have been collected
                if key in new_blocks:
                    self._write_block(key, new_blocks[key])
                elif not self.backend.touch("block", key):  # not stored (any more): from memory, or cut here
                    with self.lock:
                        cached = self.memory.block(key)
                    if cached is None:
                        self._integrity_error(IntegrityError(f"block {key} vanished before session {sid!r} "
                                                             "referenced it", "missing"), sid)
                        manifest.blocks, manifest.slot = manifest.blocks[:i], None
                        with self.lock:
                            self.memory.drop(sid)  # its cached state no longer matches what is stored
                        break
                    self._write_block(key, cached)
            if manifest.slot is not None:
                blob = encode_blob(slot, {"kind": "slot", "key": manifest.slot, "fingerprint": self.fingerprint})
                self.backend.put("slot", manifest.slot, blob)
                self.stats.bytes_written += len(blob)
                with self.lock:
                    self.index.add_blob(("slot", manifest.slot), len(blob))
            self.backend.barrier()
            data = manifest.encode()
            with self.lock:
                tenure = self.tenures.get(sid, "")
            if not self.backend.put_fenced("manifest", sid, data, sid, tenure):
                raise SessionError(f"session {sid!r}: its lease ran out and was lost; this turn was not saved",
                                   "busy")
            self.backend.barrier()
            self.stats.bytes_written += len(data)
            if previous is not None and previous.slot and previous.slot != manifest.slot:
                self.backend.delete("slot", previous.slot)
                with self.lock:
                    self.index.drop_blob(("slot", previous.slot))
            with self.lock:
                entry = self._index_manifest(manifest, len(data))
            with self.lock:
                self.stats.writes += 1
                self.stats.failing_writes = 0
                self.stats.observe_write(time.monotonic() - started)
            return entry
        except (OSError, SessionError) as e:
            with self.lock:
                self.stats.write_errors += 1
                self.stats.failing_writes += 1
                self.stats.recent_write_errors.append(f"session {sid!r}: {e}")
            log.error("session %r was not saved: %s", sid, e)
            with self.lock:
                self.memory.drop(sid)  # do not serve a state the store does not have
            raise
        finally:
            with self.lock:
                self.pending[sid] -= 1
                if self.pending[sid] <= 0:
                    del self.pending[sid]
                self._unpin(pinned)
            try:
                self._drop_hold(sid)
            except BackendError as e:  # the turn is saved; its lease runs out by itself
                log.warning("session %r: could not release its lease: %s", sid, e)
            self.writer.submit(self._enforce_limits)

    def _write_block(self, key: str, tensors: Tensors) -> None:
        if self.backend.touch("block", key):
            self.stats.blocks_deduplicated += 1
            return
        blob = encode_blob(tensors, {"kind": "block", "key": key, "fingerprint": self.fingerprint})
        if self.backend.put_new("block", key, blob):
            self.stats.bytes_written += len(blob)
            self.stats.blocks_written += 1
        else:
            self.stats.blocks_deduplicated += 1
        with self.lock:
            self.index.add_blob(("block", key), len(blob))

    def _index_manifest(self, manifest: Manifest, manifest_bytes: int) -> SessionEntry:
        old = self.index.get(manifest.session_id)
        entry = SessionEntry(manifest.session_id, len(manifest.tokens), len(manifest.blocks), manifest.logical_bytes,
                             manifest.created, manifest.updated, tuple(manifest.blocks), manifest.slot,
                             manifest_bytes)
        if old is not None:
            entry.last_used = max(entry.last_used, old.last_used)
        self.index.add(entry)
        return entry

    def _with_tier(self, entry: SessionEntry | None) -> SessionEntry | None:
        if entry is not None:
            entry.in_memory = entry.session_id in self.memory.sessions
        return entry

    def flush(self) -> None:
        """Wait until every write asked for so far has landed."""
        self.writer.flush()

    def snapshot(self) -> StoreStatsSnapshot:
        """The store's counts and counters, read whole under its lock (for /metrics, /health)."""
        with self.lock:
            index, memory, stats = self.index, self.memory, self.stats
            return StoreStatsSnapshot(
                backend=self.backend.name,
                sessions={"memory": len(memory.sessions), "store": index.num_sessions},
                session_bytes={"memory": memory.nbytes, "store": index.physical_bytes},
                physical_bytes=index.physical_bytes, logical_bytes=index.logical_bytes,
                blobs={"block": index.num_blobs("block"), "slot": index.num_blobs("slot")},
                bytes_written=stats.bytes_written, blocks_collected=stats.blocks_collected,
                slots_collected=stats.slots_collected,
                evictions={"memory": memory.evictions, "store": stats.evictions["store"]},
                integrity_errors=dict(stats.integrity_errors), unavailable_errors=stats.unavailable_errors,
                unavailable=stats.unavailable, write_errors=stats.write_errors,
                failing_writes=stats.failing_writes, recent_write_errors=tuple(stats.recent_write_errors),
                write_seconds=tuple(stats.write_seconds), write_seconds_sum=stats.write_seconds_sum)

    # --- deletes, listing --------------------------------------------------------------------
    def delete(self, session_id: str) -> bool:
        """Delete a session (after its pending writes). SessionError "busy" while a request of
        this or another replica holds it."""
        check_session_id(session_id)
        with self.lock:
            if self.holds[session_id] > 0:
                raise SessionError(f"session {session_id!r} is busy with a request", "busy")
        self.acquire(session_id)
        try:
            return self._backend(lambda: self.writer.submit(self._delete_now, session_id).result())
        finally:
            self.release(session_id)

    def _delete_now(self, session_id: str, collect: bool = True) -> bool:
        data = self.backend.get("manifest", session_id)
        slot = None
        if data is not None:
            try:
                slot = Manifest.decode(data, session_id).slot
            except IntegrityError:
                pass
        legacy = self.legacy.pop(session_id, None) is not None
        if legacy:
            legacy_v1.v1_path(self.backend.root, session_id).unlink(missing_ok=True)
        self.backend.delete("manifest", session_id)
        if slot:
            self.backend.delete("slot", slot)
        self.backend.barrier()
        with self.lock:
            entry = self.index.remove(session_id)
            if slot:
                self.index.drop_blob(("slot", slot))
            self.memory.drop(session_id)
        if collect:
            self._collect(self.gc_grace_s)
        return data is not None or entry is not None or legacy

    def info(self, session_id: str) -> SessionEntry | None:
        check_session_id(session_id)
        with self.lock:
            entry = self.index.get(session_id)
        if entry is None and self.backend.shared:  # another replica may have written it
            data = self._backend(self.backend.get, "manifest", session_id)
            try:
                manifest = Manifest.decode(data, session_id) if data is not None else None
            except IntegrityError as e:
                self._integrity_error(e)
                manifest = None
            if manifest is not None:
                with self.lock:
                    entry = self._index_manifest(manifest, len(data))
        with self.lock:
            return self._with_tier(entry)

    def list(self) -> list[SessionEntry]:
        if self.backend.shared:  # other replicas' sessions too
            self._backend(lambda: self.writer.submit(self._scan).result())
        with self.lock:
            return [self._with_tier(e) for e in self.index.entries.values()]

    # --- limits, collection ------------------------------------------------------------------
    def _enforce_limits(self) -> None:
        with self.lock:
            if not self.index.over_limits():
                return
        if self.backend.shared:
            self._scan()  # other replicas' sessions count too
        with self.lock:
            protected = set(self.holds) | set(self.pending)
            victims = self.index.victims(protected)
        for sid in victims:
            if self._evict(sid):
                with self.lock:
                    self.stats.evictions["store"] += 1
        self._collect(self.gc_grace_s)

    def _evict(self, session_id: str) -> bool:
        """Delete a session under its lease (renewed meanwhile, and refusing this process's
        requests for it); a session that another replica holds is spared."""
        with self.lock:
            if self.holds[session_id] > 0 or self.pending[session_id] > 0:
                return False
            try:
                if not self._take_lease(session_id):
                    return False
            except SessionError:
                return False
            tenure = self.tenures[session_id]
            self.evicting.add(session_id)
        try:
            self._delete_now(session_id, collect=False)
        finally:
            with self.lock:
                self.evicting.discard(session_id)
                if self.tenures.get(session_id) == tenure:
                    del self.tenures[session_id]
                    try:
                        self.backend.release_lease(session_id, tenure)
                    except BackendError as e:
                        log.warning("session %r: could not release the eviction's lease: %s", session_id, e)
        return True

    def _collect(self, min_age_s: float) -> None:
        """Delete blobs that no manifest references (left by evictions, deletes and crashes)."""
        orphans = self._orphans()
        if not orphans:
            return
        if self.backend.shared:
            self._scan()
            orphans = self._orphans()
        for kind, key in orphans:
            if not self.backend.delete_if_idle(kind, key, min_age_s):
                continue  # touched lately: another replica may be about to reference it
            with self.lock:
                self.index.drop_blob((kind, key))
            if kind == "block":
                self.stats.blocks_collected += 1
            else:
                self.stats.slots_collected += 1

    def _orphans(self) -> list[tuple[str, str]]:
        with self.lock:
            return [(kind, key) for kind, key in self.index.orphans() if kind != "block" or key not in self.pinned]

    def _scan(self) -> None:
        """Rebuild the index from the store: every manifest, every blob."""
        entries = []
        for sid, stat in self.backend.list("manifest").items():
            data = self.backend.get("manifest", sid)
            try:
                manifest = Manifest.decode(data, sid)
            except IntegrityError as e:
                if data is not None:
                    self._integrity_error(e)
                continue
            last_used = max(manifest.updated, time.time() - stat.age_s)  # a resume touches the manifest
            entries.append(SessionEntry(sid, len(manifest.tokens), len(manifest.blocks), manifest.logical_bytes,
                                        manifest.created, last_used, tuple(manifest.blocks), manifest.slot,
                                        stat.size))
        blobs = {(kind, key): stat.size for kind in ("block", "slot") for key, stat in self.backend.list(kind).items()}
        with self.lock:
            self.index.rebuild(entries, blobs)
            for sid, meta in self._list_v1().items():
                if sid not in self.index.entries:
                    self.legacy[sid] = meta
                    mtime = float(meta["mtime"])
                    self.index.add(SessionEntry(sid, int(meta.get("num_tokens", -1)),
                                                int(meta.get("num_checkpoints", -1)), int(meta.get("nbytes", 0)),
                                                float(meta.get("created", mtime)), mtime))

    # --- sessions saved before the paged store -------------------------------------------------
    def _list_v1(self) -> dict[str, dict[str, str]]:
        root = getattr(self.backend, "root", None)
        return legacy_v1.list_v1(root) if root is not None else {}

    def _convert_v1(self, session_id: str) -> SessionState | None:
        """A v1 file under this id: read it, save it in the paged layout, then remove the file."""
        root = getattr(self.backend, "root", None)
        path = legacy_v1.v1_path(root, session_id) if root is not None else None
        if path is None or not path.is_file():
            with self.lock:
                self.index.remove(session_id)
                self.memory.drop(session_id)
            return None
        try:
            meta, tokens, blocks, slot = legacy_v1.read_v1(path)
        except IntegrityError as e:
            self._integrity_error(e, session_id)
            return None  # the file stays for inspection; the session starts over
        if meta.get("fingerprint") != self.fingerprint:
            raise SessionError(f"session {session_id!r} was saved by another model ({meta.get('fingerprint')}), "
                               f"not this one ({self.fingerprint})", "wrong_model")
        from .state_pool import segment_hashes  # the same keys the engine gives its blocks
        n = blocks["ckpt"].shape[1] if blocks else 0
        per_block = [{k: v[:, i].clone() for k, v in blocks.items()} for i in range(n)]
        keys = [self.block_key(h) for h in segment_hashes(tokens[:n * self.segment_size], self.segment_size)] if n else []
        if len(keys) != n:
            self._integrity_error(IntegrityError(f"{path.name}: {n} checkpoints for {len(tokens)} tokens", "format"))
            return None
        with self.lock:
            self.holds[session_id] += 1  # the conversion's own hold: the request's acquire stays
        try:
            self.put(session_id, tokens, keys, dict(zip(keys, per_block)), slot,
                     created=float(meta.get("created", time.time()))).result()
        except OSError as e:
            raise SessionError(f"session {session_id!r} could not be converted: {e}", "unavailable") from None
        path.unlink(missing_ok=True)  # only now: the paged copy is durable
        self.legacy.pop(session_id, None)
        self.stats.converted_v1 += 1
        log.info("converted session %r from %s to the paged store", session_id, legacy_v1.FORMAT)
        return SessionState(tokens, per_block, slot, self.fingerprint, float(meta.get("created", time.time())))

    # --- helpers -----------------------------------------------------------------------------
    def _integrity_error(self, error: IntegrityError, session_id: str | None = None) -> None:
        if str(error) in self._seen_damage:  # the same damage, found again (a scan, then a read)
            return
        with self.lock:
            self._seen_damage.add(str(error))
            self.stats.integrity_errors[error.kind] += 1
        where = f" (session {session_id!r} resumes from its last good checkpoint)" if session_id else ""
        log.warning("session store integrity error: %s%s", error, where)

    def _backend(self, fn, *args):
        """A store call for a request: a failure is its 503 (session "unavailable"), and /health
        says the store is unavailable until a call succeeds again."""
        try:
            result = fn(*args)
        except OSError as e:  # BackendError, and a directory that fails
            with self.lock:
                self.stats.unavailable_errors += 1
                self.stats.unavailable = f"{type(e).__name__}: {e}"
            raise SessionError(f"the session store is unavailable: {e}", "unavailable") from None
        if self.stats.unavailable is not None:
            with self.lock:
                self.stats.unavailable = None
        return result

    def close(self) -> None:
        self.flush()
        self._closed.set()
        LIVE_OWNERS.discard(self.owner)
        self.backend.close()


LIVE_OWNERS: set[str] = set()  # the stores of this process


def lease_owner_id() -> str:
    """host/pid-namespace/pid/nonce: another process can tell a lease of a dead process of its
    own host and namespace (a server killed and started again) and take it at once rather than
    wait for it to expire. A lease's holder id adds a per-tenure suffix to this."""
    return f"{socket.gethostname()}/{_pid_namespace()}/{os.getpid()}/{secrets.token_hex(6)}"


def _pid_namespace() -> str:
    """The kernel's boot and our pid namespace: pids are comparable only within both."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        return f"{boot}.{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return "unknown"


def owner_is_dead(holder: str) -> bool:
    """Whether the holder of a lease (a lease_owner_id, plus a tenure) is certainly gone: a
    process of this host and pid namespace that has exited, or an earlier life of this
    process's pid (a restart that got the same pid)."""
    try:
        host, namespace, pid, nonce = holder.split("/")[:4]
        pid = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname() or namespace != _pid_namespace() or namespace == "unknown":
        return False  # another machine or container: only the lease's expiry can tell
    if pid == os.getpid():
        return "/".join((host, namespace, str(pid), nonce)) not in LIVE_OWNERS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
