"""SessionStore: named, saved sequence states that resume across requests and restarts.

A session holds the token ids whose effect is in its state, every checkpoint block (checkpoint,
summary, conv tail at the boundary: [L, n, ...]), the online slot (online memory, key sum, conv
tail: [L, ...]) and the fingerprint of the model that made it. On disk it is one safetensors file,
written atomically (temp file, fsync, rename, fsync of the directory) with a sha256 checksum over
its contents in the header; memory keeps an LRU cache in front (engine/session_index.py). Disk
writes run in one background thread, in order, so the engine loop never waits for the disk; a
session is durable once its write has landed (`flush()` waits for that; shutdown calls it).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .session_index import SessionEntry, SessionError, SessionIndex, SessionLimits, check_session_id

FORMAT = "mcserve.session.v1"
SUFFIX = ".session.safetensors"


@dataclass
class SessionState:
    tokens: list[int]
    blocks: dict[str, torch.Tensor]   # ckpt / summary / block_conv, each [L, n, ...]
    slot: dict[str, torch.Tensor]     # online / key_sum / conv_tail, each [L, ...]
    fingerprint: str
    created: float = field(default_factory=time.time)

    @property
    def num_checkpoints(self) -> int:
        return self.blocks["ckpt"].shape[1]

    @property
    def nbytes(self) -> int:
        tensors = list(self.blocks.values()) + list(self.slot.values())
        return sum(t.numel() * t.element_size() for t in tensors) + 8 * len(self.tokens)

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {f"block.{k}": v for k, v in self.blocks.items()}
        named.update({f"slot.{k}": v for k, v in self.slot.items()})
        named["tokens"] = torch.tensor(self.tokens, dtype=torch.int64)
        return {k: v.contiguous() for k, v in named.items()}


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


class DiskWriter:
    """One background thread that applies file writes and deletes in the order they were asked
    for, so the engine loop never waits for the disk."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, name="mcserve-session-writer", daemon=True)
        self.thread.start()

    def submit(self, fn, *args) -> None:
        self.jobs.put((fn, args))

    def flush(self) -> None:
        self.jobs.join()

    def _run(self) -> None:
        while True:
            fn, args = self.jobs.get()
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - reported by the store, the writer goes on
                self.errors.append(f"{fn.__name__}{args[:1]}: {e}")
            finally:
                self.jobs.task_done()


class SessionStore:
    """Sessions in memory (LRU) and on disk. Disk writes happen behind the caller's back in
    order (`flush()` waits for them); `sync=True` writes before `put` returns."""

    def __init__(self, fingerprint: str, directory: str | Path | None = None,
                 limits: SessionLimits | None = None, sync: bool = False):
        self.fingerprint = fingerprint
        self.directory = Path(directory) if directory else None
        self.index = SessionIndex(limits or SessionLimits())
        self.memory: dict[str, SessionState] = {}
        self.writer = DiskWriter() if self.directory is not None and not sync else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._scan()

    def flush(self) -> None:
        """Wait until every saved session is on disk."""
        if self.writer is not None:
            self.writer.flush()

    def _on_disk(self, fn, *args) -> None:
        if self.writer is not None:
            self.writer.submit(fn, *args)
        else:
            fn(*args)

    # --- public ----------------------------------------------------------------------------
    def get(self, session_id: str) -> SessionState | None:
        """The saved state, or None if there is no such session. Raises SessionError(corrupt,
        wrong_model) for a bad file; other sessions are unaffected."""
        check_session_id(session_id)
        entry = self.index.get(session_id)
        if entry is None:
            return None
        state = self.memory.get(session_id)
        if state is None:
            self.flush()  # its latest version may still be on its way to disk
            state = self._read(session_id)
            self._remember(session_id, state, entry)
        self.index.touch(entry)
        return state

    def put(self, session_id: str, state: SessionState) -> SessionEntry:
        check_session_id(session_id)
        old = self.index.get(session_id)
        entry = SessionEntry(session_id, len(state.tokens), state.num_checkpoints, state.nbytes,
                             created=old.created if old else state.created, last_used=time.time())
        if self.directory is not None:
            self._on_disk(self._write, session_id, state)
            entry.on_disk = True
        self._remember(session_id, state, entry)
        self.index.touch(entry)
        self._evict(keep=session_id)
        return entry

    def delete(self, session_id: str) -> bool:
        check_session_id(session_id)
        entry = self.index.remove(session_id)
        self.memory.pop(session_id, None)
        if self.directory is not None:
            self._on_disk(self._unlink, session_id)
        return entry is not None

    def _unlink(self, session_id: str) -> None:
        self._path(session_id).unlink(missing_ok=True)

    def info(self, session_id: str) -> SessionEntry | None:
        check_session_id(session_id)
        return self.index.get(session_id)

    def list(self) -> list[SessionEntry]:
        return list(self.index.entries.values())

    # --- tiers -----------------------------------------------------------------------------
    def _remember(self, session_id: str, state: SessionState, entry: SessionEntry) -> None:
        self.memory[session_id] = state
        entry.in_memory = True
        self.index.touch(entry)
        self._evict(keep=session_id)

    def _evict(self, keep: str) -> None:
        for sid in self.index.memory_victims(keep):
            entry = self.index.get(sid)
            self.memory.pop(sid, None)
            entry.in_memory = False
            self.index.evictions["memory"] += 1
            if not entry.on_disk:  # nowhere else to keep it
                self.index.remove(sid)
        for sid in self.index.disk_victims(keep):
            self.index.evictions["disk"] += 1
            self.delete(sid)

    # --- disk ------------------------------------------------------------------------------
    def _path(self, session_id: str) -> Path:
        return self.directory / f"{session_id}{SUFFIX}"

    def _scan(self) -> None:
        """Index the sessions already on disk (a restart) from their headers and file times."""
        files = sorted(self.directory.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)
        for path in files:
            session_id = path.name[: -len(SUFFIX)]
            meta = _read_metadata(path)
            stat = path.stat()
            entry = SessionEntry(session_id, int(meta.get("num_tokens", -1)), int(meta.get("num_checkpoints", -1)),
                                 int(meta.get("nbytes", stat.st_size)), float(meta.get("created", stat.st_mtime)),
                                 stat.st_mtime, on_disk=True)
            self.index.entries[session_id] = entry

    def _write(self, session_id: str, state: SessionState) -> None:
        tensors = state.tensors()
        meta = {"format": FORMAT, "fingerprint": state.fingerprint, "checksum": checksum(tensors),
                "num_tokens": str(len(state.tokens)), "num_checkpoints": str(state.num_checkpoints),
                "nbytes": str(state.nbytes), "created": repr(state.created)}
        final = self._path(session_id)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)  # never leave a half-written file behind
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _read(self, session_id: str) -> SessionState:
        path = self._path(session_id) if self.directory is not None else None
        if path is None or not path.is_file():
            self.index.remove(session_id)
            raise SessionError(f"session {session_id!r} was lost from disk", "not_found")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # safetensors raises several types on corrupt files
            raise SessionError(f"session {session_id!r} is corrupt ({e})", "corrupt") from None
        if meta.get("format") != FORMAT:
            raise SessionError(f"session {session_id!r} has unknown format {meta.get('format')!r}", "corrupt")
        if meta.get("checksum") != checksum(tensors):
            raise SessionError(f"session {session_id!r} is corrupt (checksum mismatch)", "corrupt")
        if meta.get("fingerprint") != self.fingerprint:
            raise SessionError(f"session {session_id!r} was saved by another model "
                               f"({meta.get('fingerprint')}), not this one ({self.fingerprint})", "wrong_model")
        return SessionState(
            tokens=tensors.pop("tokens").tolist(),
            blocks={k[len("block."):]: v for k, v in tensors.items() if k.startswith("block.")},
            slot={k[len("slot."):]: v for k, v in tensors.items() if k.startswith("slot.")},
            fingerprint=meta["fingerprint"], created=float(meta.get("created", time.time())))


def _read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # a corrupt file is still listed; reading it reports the damage
        return {}
