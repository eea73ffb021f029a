"""Sessions saved before the paged store: one `<session>.session.safetensors` file each
(format mcserve.session.v1), at the top of the session directory. They are read once, on first
use, converted to the paged layout, and removed only after the conversion is durable."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from safetensors import safe_open

from .codec import IntegrityError

FORMAT = "mcserve.session.v1"
SUFFIX = ".session.safetensors"


def v1_path(root: Path, session_id: str) -> Path:
    return root / f"{session_id}{SUFFIX}"


def list_v1(root: Path) -> dict[str, dict[str, str]]:
    """Session id -> the file's metadata (unreadable files too: reading them reports the damage)."""
    found = {}
    for path in root.glob(f"*{SUFFIX}"):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # noqa: BLE001 - safetensors raises several types on damaged files
            meta = {}
        found[path.name[:-len(SUFFIX)]] = {**meta, "mtime": repr(path.stat().st_mtime)}
    return found


def checksum_v1(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def read_v1(path: Path) -> tuple[dict[str, str], list[int], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(metadata, tokens, blocks [L, n, ...] by name, slot [L, ...] by name). Raises IntegrityError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise IntegrityError(f"{path.name} is unreadable ({e})", "truncated") from None
    if meta.get("format") != FORMAT:
        raise IntegrityError(f"{path.name} has format {meta.get('format')!r}", "format")
    if meta.get("checksum") != checksum_v1(tensors):
        raise IntegrityError(f"{path.name} fails its checksum", "checksum")
    meta.setdefault("created", repr(time.time()))
    tokens = tensors.pop("tokens").tolist()
    blocks = {k[len("block."):]: v for k, v in tensors.items() if k.startswith("block.")}
    slot = {k[len("slot."):]: v for k, v in tensors.items() if k.startswith("slot.")}
    return meta, tokens, blocks, slot
