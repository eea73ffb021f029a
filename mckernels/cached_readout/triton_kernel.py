"""Cached read-out in Triton: walk a sequence's block table, score every checkpoint's summary,
and accumulate `sum_i g_i C_i^T q` with the grm/soup softmax, the residual sum, or ssc top-k.

Grid: (batch, heads x dv blocks, splits). Every program first scores all of its sequence's
checkpoints from their summaries (dk values each, so cheap next to a [dk, dv] checkpoint), tile by
tile with an online max and denominator; for ssc it first finds the top_k (score, index) pairs in
top_k sweeps. That fixes every weight. Then it reads only its share of the block table (flash-
decoding style: when batch x heads is too small to fill the GPU the table is split over several
programs whose partial sums are added afterwards) and only the checkpoints with non-zero weight,
so ssc reads top_k checkpoints however many are cached. Storage may be bf16; accumulation is fp32.

The table width is a runtime stride and the score tiles have a fixed size, so a growing table
never triggers a recompile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MODE_IDS = {"residual": 0, "grm": 1, "soup": 1, "ssc": 2}
SCORE_TILE = 32          # checkpoints scored per step of pass 1
TARGET_PROGRAMS = 512    # ~4 programs per SM on an H100; below this, split the block tables
MIN_BLOCKS_PER_SPLIT = 4


@triton.jit
def _scores(summaries, tables, b, h, start, n, max_n, u_t, offs_k, mask_k, scale,
            H: tl.constexpr, DK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scores of checkpoints [start, start + BLOCK_N) of sequence b, head h (-inf past n)."""
    idx = start + tl.arange(0, BLOCK_N)
    live = idx < n
    blocks = tl.cast(tl.load(tables + b * max_n + idx, mask=live, other=0), tl.int64)
    summ = tl.load(summaries + (blocks[:, None] * H + h) * DK + offs_k[None, :],
                   mask=live[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
    return idx, tl.where(live, tl.sum(summ * u_t[None, :], axis=1) * scale, float("-inf"))


@triton.jit
def _ranks_before(s, i, t_s, t_i):
    """(s, i) comes first in the order score descending, then index ascending."""
    return (s > t_s) | ((s == t_s) & (i < t_i))


@triton.jit
def _cached_readout_kernel(pool, summaries, tables, lengths, q, u, r_online, y, g_online, scale, max_n,
                           blocks_per_split,
                           H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, NUM_VB: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                           MODE: tl.constexpr, TOP_K: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1) // NUM_VB
    vb = tl.program_id(1) % NUM_VB
    split = tl.program_id(2)
    B = tl.num_programs(0)
    row = b * H + h
    n = tl.load(lengths + b)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    q_t = tl.load(q + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    u_t = tl.load(u + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    r_on = tl.load(r_online + row).to(tl.float32)

    # ssc: the last selected (score, index) pair, found by TOP_K sweeps for the next best.
    t_s = float("-inf")
    t_i = -1
    if MODE == 2:
        t_s = float("inf")
        for _ in tl.static_range(TOP_K):
            best_s = float("-inf")
            best_i = max_n
            for start in range(0, n, BLOCK_N):
                idx, s = _scores(summaries, tables, b, h, start, n, max_n, u_t, offs_k, mask_k, scale,
                                 H, DK, BLOCK_N)
                after = (s < t_s) | ((s == t_s) & (idx > t_i))       # not picked yet
                s = tl.where(after & (idx < n), s, float("-inf"))
                tile_s = tl.max(s, axis=0)
                tile_i = tl.min(tl.where(s == tile_s, idx, max_n), axis=0)
                better = (tile_s > float("-inf")) & _ranks_before(tile_s, tile_i, best_s, best_i)
                best_s = tl.where(better, tile_s, best_s)
                best_i = tl.where(better, tile_i, best_i)
            found = best_s > float("-inf")                           # fewer than TOP_K checkpoints
            t_s = tl.where(found, best_s, t_s)
            t_i = tl.where(found, best_i, t_i)

    # Softmax max and denominator over the (selected) checkpoints and the online score.
    m = r_on
    denom = 1.0
    if MODE != 0:
        for start in range(0, n, BLOCK_N):
            idx, s = _scores(summaries, tables, b, h, start, n, max_n, u_t, offs_k, mask_k, scale,
                             H, DK, BLOCK_N)
            if MODE == 2:
                s = tl.where(_ranks_before(s, idx, t_s, t_i) | (idx == t_i), s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            denom = denom * tl.exp(m - m_new) + tl.sum(tl.where(s > float("-inf"), tl.exp(s - m_new), 0.0), axis=0)
            m = m_new

    # This program's share of the table: read the checkpoints that carry weight.
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    lo = split * blocks_per_split
    hi = tl.minimum(lo + blocks_per_split, n)
    for i in range(lo, hi):
        blk = tl.cast(tl.load(tables + b * max_n + i), tl.int64)
        w = 1.0
        if MODE != 0:
            summ = tl.load(summaries + (blk * H + h) * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            s = tl.sum(summ * u_t, axis=0) * scale
            w = tl.exp(s - m) / denom
            if MODE == 2:
                w = tl.where(_ranks_before(s, i, t_s, t_i) | (i == t_i), w, 0.0)
        if w != 0.0:
            c_ptrs = pool + (blk * H + h) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
            C = tl.load(c_ptrs, mask=mask_k[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
            acc += w * tl.sum(q_t[:, None] * C, axis=0)
    tl.store(y + (split * B * H + row) * DV + offs_v, acc, mask=mask_v)
    if (vb == 0) & (split == 0):
        tl.store(g_online + row, tl.exp(r_on - m) / denom)


def num_splits(batch: int, heads: int, v_blocks: int, max_n: int) -> int:
    """How many programs share one (sequence, head, dv block): enough to fill the GPU, never fewer
    than MIN_BLOCKS_PER_SPLIT checkpoints each."""
    programs = batch * heads * v_blocks
    if programs >= TARGET_PROGRAMS or max_n <= MIN_BLOCKS_PER_SPLIT:
        return 1
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, programs), max_n // MIN_BLOCKS_PER_SPLIT))


def cached_readout_triton(pool, summaries, tables, lengths, q, u, r_online, mode: str, top_k: int, scale: float,
                          splits: int | None = None):
    """Same contract as `cached_readout_ref`; `splits` overrides the flash-decoding split."""
    B, H, DK = q.shape
    DV = pool.shape[-1]
    max_n = tables.shape[1]
    block_v = min(64, triton.next_power_of_2(DV))
    v_blocks = triton.cdiv(DV, block_v)
    splits = splits or num_splits(B, H, v_blocks, max_n)
    per_split = max(1, triton.cdiv(max_n, splits))
    partial = torch.empty(splits, B, H, DV, dtype=torch.float32, device=q.device)
    g_online = torch.empty(B, H, dtype=torch.float32, device=q.device)
    _cached_readout_kernel[(B, H * v_blocks, splits)](
        pool.contiguous(), summaries.contiguous(), tables.to(torch.int32).contiguous(),
        lengths.to(torch.int32).contiguous(), q.contiguous(), (u if u is not None else q).contiguous(),
        r_online.float().contiguous(), partial, g_online, float(scale), max(max_n, 1), per_split,
        H=H, DK=DK, DV=DV, NUM_VB=v_blocks, BLOCK_N=SCORE_TILE, BLOCK_K=triton.next_power_of_2(DK),
        BLOCK_V=block_v, MODE=MODE_IDS[mode], TOP_K=max(top_k, 1),
        # A [dk, 64] checkpoint tile of dk >= 128 (Mamba2's state, GDN's keys) holds 8k+ values:
        # over 128 threads it spilled; 8 warps keep it in registers.
        num_warps=8 if triton.next_power_of_2(DK) * block_v >= 8192 else 4)
    y = partial[0] if splits == 1 else partial.sum(0)
    return y, g_online
