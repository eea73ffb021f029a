"""Where a decode step reads its cached checkpoints from: the seam of the cached read-out.

The decode read-out needs, per sequence and head, `sum_i g_i C_i^T q`, the checkpoints read
with their gates, and the gate of the online memory (1 for `residual`; a softmax over the
segments' scores `<u, s_i>` for grm/soup/ssc, where soup equals grm for matrix memories:
`(sum_i g_i C_i)^T q = sum_i g_i C_i^T q`). A source gives exactly that (`read`), so the mixer
does not care whether the checkpoints sit in a sequence's own state (DenseCheckpoints), in the
engine's paged pools read by torch (engine/model_runner.py), or in the pools read by the
Triton kernel (engine/decode_backends.py).
"""

from __future__ import annotations

import abc

import torch

from mckernels.aggregation import gate_weights, ssc_topk

from .config import ModelConfig
from .memory import Memory
from .state import LayerState


class TorchCheckpoints(abc.ABC):
    """The read-out in torch over `summaries()` [B,H,n,dk] and `weighted_sum`; `mask` [B,n]
    marks the real checkpoints when sequences have different numbers (None: all real)."""

    mask: torch.Tensor | None = None
    count: int = 0

    @abc.abstractmethod
    def summaries(self) -> torch.Tensor:
        """The checkpoints' key summaries, [B,H,n,dk]."""

    @abc.abstractmethod
    def weighted_sum(self, weights: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """sum_i w_i C_i -> [B,H,dk,dv]. weights [B,H,n], or [B,H,k] over the checkpoints `index`."""

    def read(self, q: torch.Tensor, u: torch.Tensor | None, r_online: torch.Tensor | None,
             c: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum_i g_i C_i^T q [B,H,dv], g_online [B,H]) for queries q [B,H,dk], connectors u and
        online scores r_online [B,H] (None for residual)."""
        if c.aggregation == "residual":  # sum_i C_i^T q = (sum_i C_i)^T q
            return Memory.read(self.total(), q), torch.ones(q.shape[:2], device=q.device)
        cached_r = (self.summaries() @ u[..., None])[..., 0] * c.score_scale  # [B,H,n]
        if self.mask is not None:
            cached_r = cached_r.masked_fill(~self.mask[:, None, :], float("-inf"))
        index = None
        if c.aggregation == "ssc" and cached_r.shape[-1] > c.ssc_top_k:
            # Only the selected checkpoints are read (hidden ones score -inf and weigh 0).
            cached_r, index = ssc_topk(cached_r, c.ssc_top_k)
        g_cached, g_online = gate_weights(cached_r, r_online, None, c.aggregation, c.ssc_top_k)
        return Memory.read(self.weighted_sum(g_cached, index), q), g_online

    def total(self) -> torch.Tensor:
        """sum_i C_i over the real checkpoints -> [B,H,dk,dv]."""
        summaries = self.summaries()
        ones = torch.ones(summaries.shape[:3], device=summaries.device)
        if self.mask is not None:
            ones = ones * self.mask[:, None, :]
        return self.weighted_sum(ones)


class DenseCheckpoints(TorchCheckpoints):
    """The checkpoints of a model-level state: [B,H,n,dk,dv], all real unless masked."""

    def __init__(self, st: LayerState):
        self.ckpts, self.summary_tensor, self.mask = st.ckpts, st.summaries, st.ckpt_mask
        self.count = self.ckpts.shape[2]

    def summaries(self) -> torch.Tensor:
        return self.summary_tensor

    def weighted_sum(self, weights: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        ckpts = self.ckpts
        if index is not None:
            ckpts = ckpts.gather(2, index[..., None, None].expand(-1, -1, -1, *ckpts.shape[-2:]))
        mixed = weights[..., None, :] @ ckpts.flatten(3)  # [B,H,1,dk*dv]
        return mixed.view(*ckpts.shape[:2], *ckpts.shape[3:])
