"""The recurrent state of a batch of sequences, and its exact save/load (safetensors).

Per layer it holds the online memory, the cached segment checkpoints with their key summaries,
the running key sum of the current segment and the short-conv tail. All sequences of one
state share a position (`num_tokens`); the engine keeps per-sequence states in its own pools.
States are always fp32: they are summed over thousands of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STATE_FORMAT = "mcserve.state.v2"


class StateError(ValueError):
    """A saved state cannot be loaded (missing, corrupt, or for another model)."""


@dataclass
class LayerState:
    online: torch.Tensor               # [B,H,dk,dv]
    key_sum: torch.Tensor              # [B,H,dk], keys of the current segment so far
    ckpts: torch.Tensor                # [B,H,n,dk,dv], one per finished segment
    summaries: torch.Tensor            # [B,H,n,dk], mean key of each finished segment
    conv_tail: torch.Tensor | None     # [B,W-1,C] inputs of the short conv, None if off
    # The conv tail at each checkpoint's boundary: with the checkpoint it is everything needed
    # to restart a sequence there (prefix reuse, a session that diverges).
    ckpt_conv: torch.Tensor | None = None  # [B,n,W-1,C]
    ckpt_mask: torch.Tensor | None = None  # [B,n] bool, engine batches only; never saved

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {"online": self.online, "key_sum": self.key_sum,
                 "ckpts": self.ckpts, "summaries": self.summaries,
                 "conv_tail": self.conv_tail, "ckpt_conv": self.ckpt_conv}
        return {k: v for k, v in named.items() if v is not None}

    def append_checkpoint(self, ckpt: torch.Tensor, summary: torch.Tensor, conv: torch.Tensor | None) -> None:
        self.ckpts = torch.cat([self.ckpts, ckpt[:, :, None]], dim=2)
        self.summaries = torch.cat([self.summaries, summary[:, :, None]], dim=2)
        if self.ckpt_conv is not None:
            self.ckpt_conv = torch.cat([self.ckpt_conv, conv[:, None]], dim=1)


@dataclass
class MCState:
    layers: list[LayerState]
    num_tokens: int = 0
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.layers[0].online.shape[0]

    @property
    def num_checkpoints(self) -> int:
        return self.layers[0].ckpts.shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors().values())

    def clone(self) -> "MCState":
        layers = [LayerState(**{k: (v.clone() if v is not None else None) for k, v in vars(ls).items()})
                  for ls in self.layers]
        return MCState(layers, self.num_tokens, dict(self.meta))

    def save(self, path: str | Path, fingerprint: str = "") -> None:
        tensors = {f"layers.{i}.{name}": t.detach().contiguous().cpu()
                   for i, ls in enumerate(self.layers) for name, t in ls.tensors().items()}
        meta = {"format": STATE_FORMAT, "num_tokens": str(self.num_tokens),
                "num_layers": str(len(self.layers)), "fingerprint": fingerprint}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None,
             device: torch.device | str = "cpu") -> "MCState":
        """Load a saved state; if `fingerprint` is given it must match the one saved."""
        path = Path(path)
        if not path.is_file():
            raise StateError(f"state file not found: {path}")
        try:
            tensors = load_file(str(path), device=str(device))
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise StateError(f"{path}: not a readable state file ({e})") from None
        if meta.get("format") != STATE_FORMAT:
            raise StateError(f"{path}: unknown state format {meta.get('format')!r}, expected {STATE_FORMAT}")
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            raise StateError(f"{path}: state was saved for model {meta.get('fingerprint')!r}, "
                             f"not this model ({fingerprint})")
        layers = [_layer_from(tensors, i, path) for i in range(int(meta["num_layers"]))]
        return cls(layers, int(meta["num_tokens"]), meta)


def _layer_from(tensors: dict[str, torch.Tensor], i: int, path: Path) -> LayerState:
    def get(name: str, required: bool = True) -> torch.Tensor | None:
        key = f"layers.{i}.{name}"
        if key not in tensors and required:
            raise StateError(f"{path}: tensor {key!r} is missing")
        return tensors.get(key)
    return LayerState(get("online"), get("key_sum"), get("ckpts"), get("summaries"),
                      get("conv_tail", required=False), get("ckpt_conv", required=False))
