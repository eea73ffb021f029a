"""Chunked prefill of a gated linear memory in Triton (in the manner of flash-linear-attention's
fused chunk kernels): one program per (head, dv block) walks the chunks in order, keeping its
[dk, BLOCK_V] slice of the state in registers. Per chunk: intra-chunk scores `(Q K^T) * decay`,
`O = A V + (Q * gamma) M`, then `M = gamma_L M + (K * decay_to_end)^T V`; the state after each
chunk is written out (the caller keeps the ones at segment ends as checkpoints), and `reset_after`
restarts the memory at a `reset` boundary. fp32 throughout (the products at fp32 accuracy:
see DOT_PRECISION).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# On NVIDIA, tl.dot of fp32 operands defaults to TF32 (a 10-bit mantissa), which the interpreter
# does not model and which would round every chunk's contribution to the carried state. tf32x3
# splits each operand into two TF32 parts and keeps fp32-level accuracy on the tensor cores.
DOT_PRECISION: tl.constexpr = tl.constexpr("tf32x3")
# Figures from `python -m mckernels.compile_check` (sm_90, dk = dv = chunk = 64). Not tuned on a GPU.
# - One pipeline stage: each stage is another copy of every tile in shared memory. With Triton's
#   default of three (and TF32 products, 64-wide dv tiles) the delta scan needed 256 KiB, more
#   than the 227 KiB an H100 gives a block: it could not launch. Now 16-32 KiB a kernel.
# - dv tiles of 16: the tf32x3 operands spill registers; 16-wide state tiles spill the least
#   (stack 296 / 80 / 0 bytes for the three kernels, against 408 / 488 / 224 at 64) and give a
#   prefill of one sequence 4x more programs to fill the GPU with.
LAUNCH = dict(num_warps=4, num_stages=1)
MAX_BLOCK_V = 16


@triton.jit
def dot(a, b):
    return tl.dot(a, b, input_precision=DOT_PRECISION)


# The number of chunks is a plain runtime argument, never specialised on (not even on == 1 or on
# divisibility by 16): one compiled kernel serves every prompt length.
@triton.jit(do_not_specialize=["n_chunks"])
def _chunk_prefill_kernel(q, k, v, log_a, M0, out, states, final, reset_after, n_chunks,
                          H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                          CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_V: tl.constexpr):
    h = tl.program_id(0)
    vb = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)  # the chunk's rows, padded to a power of two (masked)
    mask_t = offs_t < CHUNK
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    tile = mask_k[:, None] & mask_v[None, :]
    state_ptrs = (h * DK + offs_k[:, None]) * DV + offs_v[None, :]
    M = tl.load(M0 + state_ptrs, mask=tile, other=0.0)
    causal = offs_t[:, None] >= offs_t[None, :]
    for n in range(n_chunks):
        rows = n * CHUNK + offs_t
        row_k = mask_t[:, None] & mask_k[None, :]
        row_v = mask_t[:, None] & mask_v[None, :]
        qc = tl.load(q + (rows[:, None] * H + h) * DK + offs_k[None, :], mask=row_k, other=0.0).to(tl.float32)
        kc = tl.load(k + (rows[:, None] * H + h) * DK + offs_k[None, :], mask=row_k, other=0.0).to(tl.float32)
        vc = tl.load(v + (rows[:, None] * H + h) * DV + offs_v[None, :], mask=row_v, other=0.0).to(tl.float32)
        G = tl.cumsum(tl.load(log_a + rows * H + h, mask=mask_t, other=0.0).to(tl.float32), axis=0)
        G_end = tl.sum(tl.where(offs_t == CHUNK - 1, G, 0.0), axis=0)
        decay = tl.where(causal, tl.exp(G[:, None] - G[None, :]), 0.0)
        attn = dot(qc, tl.trans(kc)) * decay                                 # [BLOCK_T, BLOCK_T]
        o = dot(attn, vc) + dot(qc * tl.exp(G)[:, None], M)                  # [BLOCK_T, BLOCK_V]
        tl.store(out + (rows[:, None] * H + h) * DV + offs_v[None, :], o, mask=row_v)
        k_end = kc * tl.exp(G_end - G)[:, None]
        M = tl.exp(G_end) * M + dot(tl.trans(k_end), vc)
        tl.store(states + n * H * DK * DV + state_ptrs, M, mask=tile)
        if tl.load(reset_after + n) != 0:
            M = M * 0.0
    tl.store(final + state_ptrs, M, mask=tile)


def chunk_prefill_triton(q, k, v, log_a, M0, chunk: int, reset_after: torch.Tensor | None = None):
    """Same contract as `chunk_prefill_ref`."""
    T, H, DK = q.shape
    DV = v.shape[-1]
    assert T % chunk == 0, "pad T to a multiple of the chunk"
    N = T // chunk
    out = torch.empty(T, H, DV, dtype=torch.float32, device=q.device)
    states = torch.empty(N, H, DK, DV, dtype=torch.float32, device=q.device)
    final = torch.empty(H, DK, DV, dtype=torch.float32, device=q.device)
    if reset_after is None:
        reset_after = torch.zeros(N, dtype=torch.int32, device=q.device)
    # tl.dot wants every dimension >= 16 on NVIDIA: pad the chunk, dk and dv tiles (masked) up to it.
    block_v = max(16, min(MAX_BLOCK_V, triton.next_power_of_2(DV)))
    grid = (H, triton.cdiv(DV, block_v))
    _chunk_prefill_kernel[grid](
        q.contiguous(), k.contiguous(), v.contiguous(), log_a.contiguous(), M0.float().contiguous(), out, states,
        final, reset_after.to(torch.int32).contiguous(), N, H=H, DK=DK, DV=DV, CHUNK=chunk,
        BLOCK_T=max(16, triton.next_power_of_2(chunk)), BLOCK_K=max(16, triton.next_power_of_2(DK)), BLOCK_V=block_v,
        **LAUNCH)
    return out, states, final
