"""The decode backends: where a decode step keeps the online memories and reads the checkpoints.

A backend gives `MCMixer.decode_step` its two seams (models/mixer.py) and applies the segment
end to the pooled memories; the mixer's math, and the rule of the segment end
(`Mixer.close_segment`), are the same for both:

- `TorchDecode`: the online memories are gathered into a batch, updated by the memory's own
  `update`, and scattered back; the checkpoints are read through the block tables by torch
  (`PooledCheckpoints`); the segment end writes what `close_segment` returned.
- `TritonDecode` (the CUDA path): the online memories stay in the slot pool and
  `mckernels/decode_step` updates them in place; `mckernels/cached_readout` walks the block tables;
  `mckernels/segment_end` (whose torch reference is `segment_end_ref`) copies and resets in place.
  `soup` runs as `grm` (equal for matrix memories).

Both have a fixed shape (no host-side branching), so a step can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mckernels.cached_readout.triton_kernel import cached_readout_triton
from mckernels.chunk_prefill.terms_kernel import chunk_scan_terms_triton
from mckernels.chunk_prefill.triton_kernel import chunk_prefill_triton
from mckernels.decode_step.triton_kernel import decode_step_triton
from mckernels.segment_end.triton_kernel import segment_end_triton
from models.checkpoints import TorchCheckpoints

__all__ = ["PooledCheckpoints", "PrefillKernels", "TorchDecode", "TritonDecode"]


class PooledCheckpoints(TorchCheckpoints):
    """A decode batch's checkpoints read in place from the pool through padded block tables.

    `sum_i g_i C_i` is an `embedding_bag` over rows (block, head) of the pool: each checkpoint is
    read once and nothing of size [B, n, H, dk, dv] is materialised (the torch reference of the
    cached read-out kernel). For ssc only the selected blocks are read.
    """

    def __init__(self, ckpt: torch.Tensor, summary: torch.Tensor, table: torch.Tensor,
                 mask: torch.Tensor | None):
        self.pool, self.summary, self.table, self.mask = ckpt, summary, table.long(), mask  # pool [N,H,dk,dv]
        self.count = table.shape[1]

    def summaries(self) -> torch.Tensor:
        return self.summary[self.table].transpose(1, 2)  # [B,H,n,dk]

    def weighted_sum(self, weights: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n = weights.shape
        N, _, dk, dv = self.pool.shape
        if index is None:
            blocks = self.table[:, None, :].expand(B, H, n)
        else:
            blocks = self.table.gather(1, index.flatten(1)).view(B, H, n)
        rows = (blocks * H + torch.arange(H, device=blocks.device)[None, :, None]).flatten(0, 1)
        flat = self.pool.view(N * H, dk * dv)
        # bf16 storage reads half the bytes (4x faster here); the gates and the sum are rounded
        # to bf16 too, a relative error of ~2e-3 on top of storing the checkpoints in bf16.
        out = F.embedding_bag(rows, flat, per_sample_weights=weights.flatten(0, 1).to(flat.dtype), mode="sum")
        return out.view(B, H, dk, dv).float()


class TritonCheckpoints:
    """The cached read-out on `mckernels/cached_readout`, over the same pools and tables."""

    def __init__(self, ckpt: torch.Tensor, summary: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor):
        self.pool, self.summary, self.table, self.lengths = ckpt, summary, table, lengths
        self.count = table.shape[1]

    def read(self, q, u, r_online, c):
        if u is None:  # residual: every checkpoint with weight 1, the online memory too
            u, r_online = q, torch.zeros(q.shape[:2], device=q.device)
        return cached_readout_triton(self.pool, self.summary, self.table, self.lengths, q, u, r_online,
                                     c.aggregation, c.ssc_top_k, c.score_scale)


class TorchDecode:
    keeps_online_in_pool = False  # the runner gathers the memories; the mixer updates them

    @staticmethod
    def checkpoints(ckpt, summary, table, lengths) -> PooledCheckpoints:
        mask = torch.arange(table.shape[1], device=table.device)[None, :] < lengths[:, None]
        return PooledCheckpoints(ckpt, summary, table, mask)

    @staticmethod
    def online_step(online_pool, slot_ids):
        return None

    @staticmethod
    def end_segments(online_pool, slot_ids, targets, rows, ckpt_pool, checkpoint, M_after, reset: bool) -> None:
        """`close_segment` gave the checkpoints and the memories after it: write both back
        (rows whose segment goes on write their checkpoint to the spare block)."""
        ckpt_pool.index_copy_(0, rows, checkpoint.to(ckpt_pool.dtype))
        online_pool.index_copy_(0, slot_ids, M_after)


class TritonDecode:
    keeps_online_in_pool = True

    @staticmethod
    def checkpoints(ckpt, summary, table, lengths) -> TritonCheckpoints:
        return TritonCheckpoints(ckpt, summary, table, lengths)

    @staticmethod
    def online_step(online_pool, slot_ids):
        return lambda q, k, v, log_a, beta: decode_step_triton(online_pool, slot_ids, q, k, v, log_a, beta)

    @staticmethod
    def end_segments(online_pool, slot_ids, targets, rows, ckpt_pool, checkpoint, M_after, reset: bool) -> None:
        """The memories are in the pool: the kernel copies (rows of `targets`) and resets in place."""
        segment_end_triton(online_pool, slot_ids, targets, ckpt_pool, reset=reset)


@dataclass(frozen=True)
class PrefillKernels:
    """The fused chunk scans `MCMixer.chunked` takes as `scan`: gla/linear straight from the
    projections, the delta rule from its chunk terms (after torch's triangular solve)."""
    gated: object = chunk_prefill_triton
    terms: object = chunk_scan_terms_triton
