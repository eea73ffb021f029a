"""The chunk-to-chunk loop over precomputed chunk terms in Triton (in the manner of
flash-linear-attention's chunk_delta_h + chunk_o): the delta rule's chunks need a triangular
solve, which torch does for all chunks at once (`DeltaMemory.chunk_terms`); what remains is
sequential and memory-bound, and runs here. One program per (sequence x head, dv block) keeps its
[dk, BLOCK_V] slice of the state in registers; per chunk `U = U' - W M`, `O = A U + Qd M`,
`M <- gamma_L M + Kend^T U` (the columns of U depend only on the same columns of M, so dv blocks are
independent). fp32 throughout (products at fp32 accuracy: see DOT_PRECISION in triton_kernel.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_kernel import LAUNCH, MAX_BLOCK_V, dot


@triton.jit(do_not_specialize=["N"])  # one compiled kernel for every number of chunks
def _terms_scan_kernel(qd, attn, values, w, k_end, gamma_end, M0, out, states, reset_after, N,
                       L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, HAS_W: tl.constexpr):
    bh = tl.cast(tl.program_id(0), tl.int64)
    vb = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_t, mask_k, mask_v = offs_t < L, offs_k < DK, offs_v < DV
    tile = mask_k[:, None] & mask_v[None, :]
    row_k = mask_t[:, None] & mask_k[None, :]
    row_v = mask_t[:, None] & mask_v[None, :]
    M = tl.load(M0 + bh * DK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=tile, other=0.0)
    for n in range(N):
        chunk = bh * N + n
        rows = chunk * L + offs_t
        Qd = tl.load(qd + rows[:, None] * DK + offs_k[None, :], mask=row_k, other=0.0)
        Ke = tl.load(k_end + rows[:, None] * DK + offs_k[None, :], mask=row_k, other=0.0)
        U = tl.load(values + rows[:, None] * DV + offs_v[None, :], mask=row_v, other=0.0)
        A = tl.load(attn + chunk * L * L + offs_t[:, None] * L + offs_t[None, :],
                    mask=mask_t[:, None] & mask_t[None, :], other=0.0)
        if HAS_W:
            W = tl.load(w + rows[:, None] * DK + offs_k[None, :], mask=row_k, other=0.0)
            U = U - dot(W, M)
        o = dot(A, U) + dot(Qd, M)
        tl.store(out + rows[:, None] * DV + offs_v[None, :], o, mask=row_v)
        M = tl.load(gamma_end + chunk) * M + dot(tl.trans(Ke), U)
        tl.store(states + chunk * DK * DV + offs_k[:, None] * DV + offs_v[None, :], M, mask=tile)
        if tl.load(reset_after + n) != 0:
            M = M * 0.0


def chunk_scan_terms_triton(q_decayed, attn, values, w, k_to_end, gamma_end, M0, reset_after=None):
    """Same contract as `chunk_scan_terms_ref`."""
    BH, N, L, DK = q_decayed.shape
    DV = values.shape[-1]
    out = torch.empty(BH, N, L, DV, dtype=torch.float32, device=values.device)
    states = torch.empty(BH, N, DK, DV, dtype=torch.float32, device=values.device)
    if reset_after is None:
        reset_after = torch.zeros(N, dtype=torch.int32, device=values.device)
    f32 = lambda t: t.float().contiguous()
    # tl.dot wants every dimension >= 16 on NVIDIA: pad the tiles (masked) up to it.
    block_v = max(16, min(MAX_BLOCK_V, triton.next_power_of_2(DV)))
    _terms_scan_kernel[(BH, triton.cdiv(DV, block_v))](
        f32(q_decayed), f32(attn), f32(values), f32(w if w is not None else q_decayed), f32(k_to_end),
        f32(gamma_end), f32(M0), out, states, reset_after.to(torch.int32).contiguous(), N,
        L=L, DK=DK, DV=DV, BLOCK_T=max(16, triton.next_power_of_2(L)), BLOCK_K=max(16, triton.next_power_of_2(DK)),
        BLOCK_V=block_v, **LAUNCH, HAS_W=w is not None)
    return out, states
