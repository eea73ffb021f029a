"""Plain-torch reference of the chunked prefill of a gated linear memory (same signature as
the Triton kernel): the online read-out of every token and the state at every chunk end.

q, k [T,H,dk]; v [T,H,dv]; log_a [T,H] (zeros: plain linear attention); M0 [H,dk,dv] (fp32).
T must be a multiple of `chunk` (callers pad with k = v = 0, log_a = 0, which changes nothing).
Returns o [T,H,dv], chunk_states [T/chunk,H,dk,dv] (the state after each chunk), and the final
state. `reset_after` marks chunks after which the memory restarts at zero (a `reset` boundary);
the state recorded for such a chunk is the one before the reset (the checkpoint).
"""

from __future__ import annotations

import torch


def chunk_prefill_ref(q, k, v, log_a, M0, chunk: int, reset_after: torch.Tensor | None = None, *,
                      matmul=torch.matmul, dtype=torch.float32):
    """`matmul` and `dtype` let `benchmarks.tf32_emulation` replay the products at a GPU's precision."""
    T, H, dk = q.shape
    N = T // chunk
    M = M0.to(dtype).clone()
    outs, states = [], []
    for n in range(N):
        sl = slice(n * chunk, (n + 1) * chunk)
        qc, kc, vc = (t[sl].to(dtype).transpose(0, 1) for t in (q, k, v))   # [H,L,*]
        G = log_a[sl].to(dtype).transpose(0, 1).cumsum(-1)                   # [H,L]
        decay = torch.exp(G[:, :, None] - G[:, None, :]).tril()
        attn = matmul(qc, kc.transpose(-1, -2)) * decay
        o = matmul(attn, vc) + matmul(qc * torch.exp(G)[..., None], M)
        k_to_end = kc * torch.exp(G[:, -1:] - G)[..., None]
        M = torch.exp(G[:, -1])[:, None, None] * M + matmul(k_to_end.transpose(-1, -2), vc)
        outs.append(o.transpose(0, 1))
        states.append(M.clone())
        if reset_after is not None and bool(reset_after[n]):
            M = torch.zeros_like(M)
    return torch.cat(outs), torch.stack(states), M


def chunk_scan_terms_ref(q_decayed, attn, values, w, k_to_end, gamma_end, M0, reset_after=None):
    """The chunk-to-chunk loop over precomputed chunk terms (`models.memory.ChunkTerms`), for any
    memory whose chunks reduce to `U = U' - W M` (delta, after its triangular solve; gla with W
    absent): `O = A U + Qd M`, `M <- gamma_L M + Kend^T U`.

    q_decayed, k_to_end, w [BH,N,L,dk]; attn [BH,N,L,L]; values [BH,N,L,dv]; gamma_end [BH,N];
    M0 [BH,dk,dv]. Returns o [BH,N,L,dv] and the state after each chunk [BH,N,dk,dv] (before a
    reset, as in `chunk_prefill_ref`).
    """
    M = M0.float().clone()
    outs, states = [], []
    for n in range(q_decayed.shape[1]):
        U = values[:, n] if w is None else values[:, n] - w[:, n] @ M
        outs.append(attn[:, n] @ U + q_decayed[:, n] @ M)
        M = gamma_end[:, n, None, None] * M + k_to_end[:, n].transpose(-1, -2) @ U
        states.append(M.clone())
        if reset_after is not None and bool(reset_after[n]):
            M = torch.zeros_like(M)
    return torch.stack(outs, 1), torch.stack(states, 1)
