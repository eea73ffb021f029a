"""Fused decode step in Triton: one pass over each slot's online memory.

Grid: (batch, heads, dv blocks). A program loads its slot's [dk, BLOCK_V] tile of M once, applies
the gla or delta update (the delta rule's k^T M is a column sum inside the same tile, so every dv
block is independent), writes the tile back in place and reads it out with q. Rows whose slot id
is -1 (padding) do nothing. Everything is fp32: the state is summed over thousands of tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_step_kernel(state, slot_ids, q, k, v, log_a, beta, out,
                        H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, IS_DELTA: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    vb = tl.program_id(2)
    slot = tl.load(slot_ids + b)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    # Padded rows (slot -1) read and write nothing: masks, not an early return. Built as vectors:
    # a vector & a scalar bool is refused by triton 3.9's interpreter ("mask has unsupported dtype").
    mask_k = (offs_k < DK) & (offs_k * 0 + slot >= 0)
    mask_v = (offs_v < DV) & (offs_v * 0 + slot >= 0)
    slot = tl.cast(tl.maximum(slot, 0), tl.int64)
    row = b * H + h
    q_t = tl.load(q + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    k_t = tl.load(k + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    v_t = tl.load(v + row * DV + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    # Scalars load unmasked: every row has them, and a padded row's are never used.
    a = tl.exp(tl.load(log_a + row).to(tl.float32))
    base = state + (slot * H + h) * DK * DV
    ptrs = base + offs_k[:, None] * DV + offs_v[None, :]
    tile_mask = mask_k[:, None] & mask_v[None, :]
    M = tl.load(ptrs, mask=tile_mask, other=0.0)
    if IS_DELTA:
        w = tl.load(beta + row).to(tl.float32)
        recalled = tl.sum(k_t[:, None] * M, axis=0)                     # k^T M, [BLOCK_V]
        M = a * (M - w * k_t[:, None] * recalled[None, :]) + w * k_t[:, None] * v_t[None, :]
    else:
        M = a * M + k_t[:, None] * v_t[None, :]
    tl.store(ptrs, M, mask=tile_mask)
    o = tl.sum(q_t[:, None] * M, axis=0)
    tl.store(out + row * DV + offs_v, o, mask=mask_v)


def decode_step_triton(state: torch.Tensor, slot_ids: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, log_a: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
    """Same contract as `decode_step_ref`."""
    B, H, DK = q.shape
    DV = v.shape[-1]
    assert state.dtype == torch.float32 and state.is_contiguous(), "the online state is fp32, contiguous"
    out = torch.zeros(B, H, DV, dtype=torch.float32, device=q.device)
    block_v = min(64, triton.next_power_of_2(DV))
    grid = (B, H, triton.cdiv(DV, block_v))
    _decode_step_kernel[grid](
        state, slot_ids.to(torch.int32).contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
        log_a.contiguous(), (beta if beta is not None else log_a).contiguous(), out,
        H=H, DK=DK, DV=DV, BLOCK_K=triton.next_power_of_2(DK), BLOCK_V=block_v, IS_DELTA=beta is not None)
    return out
