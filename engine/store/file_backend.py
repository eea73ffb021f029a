"""A session store in a local directory.

    DIR/manifests/<session>.json   DIR/blocks/<last two of key>/<key>   DIR/slots/<key>
    DIR/responses/<id>.json        DIR/leases/<session>

Every value is written to a temporary file, fsync'd and renamed into place, so a crash leaves
the old value or the new one; `barrier()` fsyncs the directories that renames touched, after
which the renames themselves survive a power cut. Leases are small files, read and written
under an flock(2), so taking, renewing and fencing on them is atomic across processes (on a
local filesystem: flock does not lock across NFS clients).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .backend import BackendError, Stat, StoreBackend

LAYOUT = {"manifest": ("manifests", ".json"), "block": ("blocks", ""), "slot": ("slots", ""),
          "response": ("responses", ".json")}
FANOUT = {"block"}  # many small files: two-character subdirectories
LOCK_STRIPES = 64


class FileBackend(StoreBackend):
    name = "file"

    def __init__(self, directory: str | Path):
        self.root = Path(directory)
        try:
            for sub, _ in LAYOUT.values():
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            (self.root / "leases").mkdir(exist_ok=True)
        except OSError as e:
            raise BackendError(f"session store {str(self.root)!r} cannot be created: {e.strerror or e}") from None
        self._dirty: set[Path] = set()
        self._lock = threading.Lock()

    def path(self, kind: str, key: str) -> Path:
        sub, suffix = LAYOUT[kind]
        folder = self.root / sub / key[-2:] if kind in FANOUT else self.root / sub
        return folder / f"{key}{suffix}"

    # --- values ----------------------------------------------------------------------------
    def get(self, kind, key):
        try:
            return self.path(kind, key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def put(self, kind, key, data):
        final = self.path(kind, key)
        tmp = self._write_temp(final, data)
        try:
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._mark_dirty(final.parent)

    def put_new(self, kind, key, data):
        final = self.path(kind, key)
        if final.exists():
            return False
        tmp = self._write_temp(final, data)
        try:
            os.link(tmp, final)  # atomic and exclusive: a concurrent writer of the same key loses cleanly
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        self._mark_dirty(final.parent)
        return True

    def touch(self, kind, key):
        try:
            os.utime(self.path(kind, key))
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False

    def delete(self, kind, key):
        path = self.path(kind, key)
        path.unlink(missing_ok=True)
        self._mark_dirty(path.parent)

    def delete_if_idle(self, kind, key, min_age_s):
        # Rename aside, then look at the age again: a touch that came before the rename shows,
        # and the value goes back. (A touch after the rename finds nothing and rewrites it.)
        path = self.path(kind, key)
        aside = path.with_name(f".{path.name}.{secrets.token_hex(4)}.del")
        try:
            if time.time() - path.stat().st_mtime < min_age_s:
                return False
            os.rename(path, aside)
        except (FileNotFoundError, NotADirectoryError):
            return False
        if time.time() - aside.stat().st_mtime < min_age_s:
            os.replace(aside, path)
            return False
        aside.unlink()
        self._mark_dirty(path.parent)
        return True

    def list(self, kind):
        sub, suffix = LAYOUT[kind]
        folders = [p for p in (self.root / sub).iterdir() if p.is_dir()] if kind in FANOUT else [self.root / sub]
        now, found = time.time(), {}
        for folder in folders:
            for entry in os.scandir(folder):
                if entry.name.startswith(".") or not entry.name.endswith(suffix) or not entry.is_file():
                    continue
                st = entry.stat()
                found[entry.name[:len(entry.name) - len(suffix)] if suffix else entry.name] = \
                    Stat(st.st_size, max(0.0, now - st.st_mtime))
        return found

    def barrier(self):
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for folder in dirty:
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _write_temp(self, final: Path, data: bytes) -> Path:
        if not final.parent.is_dir():  # a new fan-out folder: its own entry must be made durable too
            final.parent.mkdir(parents=True, exist_ok=True)
            self._mark_dirty(final.parent.parent)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
            raise
        return tmp

    def _mark_dirty(self, folder: Path) -> None:
        with self._lock:
            self._dirty.add(folder)

    # --- leases ----------------------------------------------------------------------------
    # Every lease operation, and a fenced put, runs under an flock(2) on one of LOCK_STRIPES
    # lock files (picked by the lease's name), so check-then-write is atomic across processes.
    def acquire_lease(self, name, owner, ttl_s):
        with self._lease_lock(name):
            held = self._read_lease(name)
            if held is not None and held["owner"] != owner and held["expires"] > time.time():
                return False
            self._write_lease(name, owner, ttl_s)
            return True

    def renew_lease(self, name, owner, ttl_s):
        with self._lease_lock(name):
            if not self._holds(name, owner):
                return False
            self._write_lease(name, owner, ttl_s)
            return True

    def put_fenced(self, kind, key, data, lease, owner):
        with self._lease_lock(lease):
            if not self._holds(lease, owner):
                return False
            self.put(kind, key, data)
            return True

    def release_lease(self, name, owner):
        with self._lease_lock(name):
            held = self._read_lease(name)
            if held is not None and held["owner"] == owner:
                self._lease_path(name).unlink(missing_ok=True)

    def lease_owner(self, name):
        held = self._read_lease(name)
        return held["owner"] if held is not None and held["expires"] > time.time() else None

    def _holds(self, name: str, owner: str) -> bool:
        return self.lease_owner(name) == owner

    def _lease_path(self, name: str) -> Path:
        return self.root / "leases" / name

    @contextmanager
    def _lease_lock(self, name: str):
        stripe = int(hashlib.blake2b(name.encode(), digest_size=2).hexdigest(), 16) % LOCK_STRIPES
        with open(self.root / "leases" / f".lock-{stripe:02d}", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield  # closing the file drops the lock

    def _write_lease(self, name: str, owner: str, ttl_s: float) -> None:
        path = self._lease_path(name)
        record = json.dumps({"owner": owner, "expires": time.time() + ttl_s}).encode()
        os.replace(self._write_temp(path, record), path)  # readers see the old record or the new

    def _read_lease(self, name: str) -> dict | None:
        try:
            held = json.loads(self._lease_path(name).read_bytes())
            return {"owner": str(held["owner"]), "expires": float(held["expires"])}
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return {"owner": "", "expires": 0.0}  # unreadable: treat as expired
