"""The decode step of one layer on the Triton kernels (the ModelRunner's CUDA path).

Same math as `MCMixer.decode_step`: the projections and the output stay in torch; the
online-state update + read-out runs in `kernels/decode_step` in place on the slot pool (so the
online states are never gathered into a batch tensor nor scattered back), and the cached read-out
walks the block tables in `kernels/cached_readout`. `soup` runs as `grm` (equal for matrix
memories). Returns (y, key_sum); the caller reads the pool rows it needs for checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.cached_readout.triton_kernel import cached_readout_triton
from kernels.chunk_prefill.terms_kernel import chunk_scan_terms_triton
from kernels.chunk_prefill.triton_kernel import chunk_prefill_triton
from kernels.decode_step.triton_kernel import decode_step_triton
from kernels.segment_end.triton_kernel import segment_end_triton

__all__ = ["PrefillKernels", "segment_end_triton", "triton_decode_step"]


def triton_decode_step(mixer, x: torch.Tensor, st, pos: torch.Tensor, online_pool: torch.Tensor,
                       slot_ids: torch.Tensor, ckpt_pool: torch.Tensor, summary_pool: torch.Tensor,
                       table: torch.Tensor, lengths: torch.Tensor):
    c = mixer.config
    p = mixer.project(x, st.conv_tail)
    st.conv_tail = p.conv_tail
    q, k, v = p.q[:, :, 0], p.k[:, :, 0], p.v[:, :, 0]
    beta = p.beta[:, :, 0] if p.beta is not None else None
    online = decode_step_triton(online_pool, slot_ids, q, k, v, p.log_a[:, :, 0], beta)  # updates the pool
    key_sum = st.key_sum + k
    if c.aggregation == "none" or table.shape[1] == 0:
        y = online
    else:
        if c.scores_segments:
            count = (pos % c.segment_size + 1).view(-1, 1, 1).to(key_sum.dtype)
            u = p.u[:, :, 0]
            r_online = (u * key_sum / count).sum(-1) * c.score_scale
        else:
            u, r_online = q, torch.zeros(q.shape[:2], device=q.device)
        cached, g_online = cached_readout_triton(ckpt_pool, summary_pool, table, lengths, q, u, r_online,
                                                 c.aggregation, c.ssc_top_k, c.score_scale)
        y = g_online[..., None] * online + cached
    return mixer.finish(y[:, :, None], p, x), key_sum


@dataclass(frozen=True)
class PrefillKernels:
    """The fused chunk scans `MCMixer.chunked` takes as `scan`: gla/linear straight from the
    projections, the delta rule from its chunk terms (after torch's triangular solve)."""
    gated: object = chunk_prefill_triton
    terms: object = chunk_scan_terms_triton
