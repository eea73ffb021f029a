"""Where a decode step reads its cached checkpoints from.

The decode read-out needs, per sequence and head, the checkpoints' key summaries (to score them)
and weighted sums of the checkpoints themselves (`sum_i g_i C_i`, the "soup" of the cached
memories; its read-out `(sum_i g_i C_i)^T q` equals `sum_i g_i C_i^T q` for matrix memories).
A source gives exactly that, so the mixer does not care whether the checkpoints sit in a
sequence's own state (here) or in the engine's paged pools (engine/model_runner.py).
"""

from __future__ import annotations

import torch

from .state import LayerState


class DenseCheckpoints:
    """The checkpoints of a model-level state: [B,H,n,dk,dv], all real unless masked."""

    def __init__(self, st: LayerState):
        self.ckpts, self.summary_tensor, self.mask = st.ckpts, st.summaries, st.ckpt_mask

    @property
    def count(self) -> int:
        return self.ckpts.shape[2]

    def summaries(self) -> torch.Tensor:
        """[B,H,n,dk]."""
        return self.summary_tensor

    def weighted_sum(self, weights: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """sum_i w_i C_i -> [B,H,dk,dv]. weights [B,H,n], or [B,H,k] over the checkpoints `index`."""
        ckpts = self.ckpts
        if index is not None:
            ckpts = ckpts.gather(2, index[..., None, None].expand(-1, -1, -1, *ckpts.shape[-2:]))
        mixed = weights[..., None, :] @ ckpts.flatten(3)  # [B,H,1,dk*dv]
        return mixed.view(*ckpts.shape[:2], *ckpts.shape[3:])

    def total(self) -> torch.Tensor:
        """sum_i C_i over the real checkpoints -> [B,H,dk,dv]."""
        ones = torch.ones(self.ckpts.shape[:3], device=self.ckpts.device)
        if self.mask is not None:
            ones = ones * self.mask[:, None, :]
        return self.weighted_sum(ones)
