"""A session store in a local directory.

    DIR/manifests/<session>.json   DIR/blocks/<last two of key>/<key>   DIR/slots/<key>
    DIR/responses/<id>.json        DIR/leases/<session>

Every value is written to a temporary file, fsync'd and renamed into place, so a crash leaves
the old value or the new one; `barrier()` fsyncs the directories that renames touched, after
which the renames themselves survive a power cut. Leases are small files created with link(2)
(atomic, fails if present) and taken over by rename(2) once expired.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path

from .backend import BackendError, Stat, StoreBackend

LAYOUT = {"manifest": ("manifests", ".json"), "block": ("blocks", ""), "slot": ("slots", ""),
          "response": ("responses", ".json")}
FANOUT = {"block"}  # many small files: two-character subdirectories


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
    def acquire_lease(self, name, owner, ttl_s):
        path = self.root / "leases" / name
        record = json.dumps({"owner": owner, "expires": time.time() + ttl_s}).encode()
        held = self._read_lease(path)
        if held is not None and held["owner"] == owner:
            os.replace(self._write_temp(path, record), path)  # a renewal
            return True
        if held is not None and held["expires"] > time.time():
            return False
        if held is not None:  # expired: exactly one taker wins the rename
            try:
                os.rename(path, path.with_name(f".{name}.stale.{secrets.token_hex(4)}"))
            except FileNotFoundError:
                return False
        tmp = self._write_temp(path, record)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
            for stale in path.parent.glob(f".{name}.stale.*"):
                stale.unlink(missing_ok=True)

    def release_lease(self, name, owner):
        path = self.root / "leases" / name
        held = self._read_lease(path)
        if held is not None and held["owner"] == owner:
            path.unlink(missing_ok=True)

    def lease_owner(self, name):
        held = self._read_lease(self.root / "leases" / name)
        return held["owner"] if held is not None and held["expires"] > time.time() else None

    @staticmethod
    def _read_lease(path: Path) -> dict | None:
        try:
            held = json.loads(path.read_bytes())
            return {"owner": str(held["owner"]), "expires": float(held["expires"])}
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return {"owner": "", "expires": 0.0}  # unreadable: treat as expired
