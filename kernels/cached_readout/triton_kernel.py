"""Cached read-out in Triton: walk a sequence's block table, score every checkpoint's summary,
and accumulate `sum_i g_i C_i^T q` with the grm/soup softmax, the residual sum, or ssc top-k.

Grid: (batch, heads, dv blocks). Pass 1 scores all of the sequence's checkpoints from their
summaries (dk values each: cheap) and fixes the softmax max and denominator (and, for ssc, the
selected set); pass 2 reads only the checkpoints with non-zero weight, tile by tile, accumulating in
fp32 (bf16 storage is cast right after the load). With ssc the cost of pass 2 stays at top_k
checkpoints however many are cached. Not yet split over blocks (flash-decoding) for small batches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MODE_IDS = {"residual": 0, "grm": 1, "soup": 1, "ssc": 2}


@triton.jit
def _cached_readout_kernel(pool, summaries, tables, lengths, q, u, r_online, y, g_online, scale,
                           H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, MAX_N: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                           MODE: tl.constexpr, TOP_K: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    vb = tl.program_id(2)
    row = b * H + h
    n = tl.load(lengths + b)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < n
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    blocks = tl.cast(tl.load(tables + b * MAX_N + offs_n, mask=mask_n, other=0), tl.int64)
    q_t = tl.load(q + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    r_on = tl.load(r_online + row).to(tl.float32)

    # Pass 1: weights of every cached checkpoint.
    if MODE == 0:
        weights = tl.where(mask_n, 1.0, 0.0)
        denom = 1.0
        g_on = 1.0
    else:
        u_t = tl.load(u + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        s_ptrs = summaries + (blocks[:, None] * H + h) * DK + offs_k[None, :]
        summ = tl.load(s_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        scores = tl.where(mask_n, tl.sum(summ * u_t[None, :], axis=1) * scale, float("-inf"))
        if MODE == 2:
            # Keep the TOP_K best (ties to the lowest index), by repeated arg-max.
            remaining = scores
            keep = offs_n < 0
            for _ in tl.static_range(TOP_K):
                best = tl.max(remaining, axis=0)
                first = tl.min(tl.where(remaining == best, offs_n, BLOCK_N), axis=0)
                first = tl.where(best > float("-inf"), first, BLOCK_N)  # nothing left to pick
                hit = offs_n == first
                keep = keep | hit
                remaining = tl.where(hit, float("-inf"), remaining)
            scores = tl.where(keep, scores, float("-inf"))
        top = tl.maximum(tl.max(scores, axis=0), r_on)
        weights = tl.where(scores > float("-inf"), tl.exp(scores - top), 0.0)
        g_on = tl.exp(r_on - top)
        denom = tl.sum(weights, axis=0) + g_on

    # Pass 2: read the checkpoints that carry weight.
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    for i in range(0, n):
        w = tl.sum(tl.where(offs_n == i, weights, 0.0), axis=0)
        if w != 0.0:
            blk = tl.cast(tl.load(tables + b * MAX_N + i), tl.int64)
            c_ptrs = pool + (blk * H + h) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
            C = tl.load(c_ptrs, mask=mask_k[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
            acc += w * tl.sum(q_t[:, None] * C, axis=0)
    tl.store(y + row * DV + offs_v, acc / denom, mask=mask_v)
    if vb == 0:
        tl.store(g_online + row, g_on / denom)


def cached_readout_triton(pool, summaries, tables, lengths, q, u, r_online, mode: str, top_k: int, scale: float):
    """Same contract as `cached_readout_ref`."""
    B, H, DK = q.shape
    DV = pool.shape[-1]
    max_n = tables.shape[1]
    y = torch.zeros(B, H, DV, dtype=torch.float32, device=q.device)
    g_online = torch.ones(B, H, dtype=torch.float32, device=q.device)
    block_v = min(64, triton.next_power_of_2(DV))
    grid = (B, H, triton.cdiv(DV, block_v))
    _cached_readout_kernel[grid](
        pool.contiguous(), summaries.contiguous(), tables.to(torch.int32).contiguous(),
        lengths.to(torch.int32).contiguous(), q.contiguous(), (u if u is not None else q).contiguous(),
        r_online.contiguous(), y, g_online, float(scale),
        H=H, DK=DK, DV=DV, MAX_N=max(max_n, 1), BLOCK_N=triton.next_power_of_2(max(max_n, 1)),
        BLOCK_K=triton.next_power_of_2(DK), BLOCK_V=block_v, MODE=MODE_IDS[mode], TOP_K=max(top_k, 1))
    return y, g_online
