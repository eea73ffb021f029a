"""The session writer of mcserve before the paged store (format mcserve.session.v1), kept
verbatim from engine/sessions.py at commit 72ffcfa, so a test can resume a file it wrote."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

FORMAT = "mcserve.session.v1"
SUFFIX = ".session.safetensors"


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def write_v1(directory: Path, session_id: str, tokens: list[int], blocks: dict[str, torch.Tensor],
             slot: dict[str, torch.Tensor], fingerprint: str) -> Path:
    """blocks: ckpt / summary / block_conv, each [L, n, ...]; slot: online / key_sum / conv_tail, [L, ...]."""
    created = time.time()
    named = {f"block.{k}": v for k, v in blocks.items()}
    named.update({f"slot.{k}": v for k, v in slot.items()})
    named["tokens"] = torch.tensor(tokens, dtype=torch.int64)
    tensors = {k: v.contiguous() for k, v in named.items()}
    nbytes = sum(t.numel() * t.element_size() for t in list(blocks.values()) + list(slot.values())) + 8 * len(tokens)
    meta = {"format": FORMAT, "fingerprint": fingerprint, "checksum": checksum(tensors),
            "num_tokens": str(len(tokens)), "num_checkpoints": str(blocks["ckpt"].shape[1]),
            "nbytes": str(nbytes), "created": repr(created)}
    final = Path(directory) / f"{session_id}{SUFFIX}"
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final
