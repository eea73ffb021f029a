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


def chunk_prefill_ref(q, k, v, log_a, M0, chunk: int, reset_after: torch.Tensor | None = None):
    T, H, dk = q.shape
    N = T // chunk
    M = M0.float().clone()
    outs, states = [], []
    for n in range(N):
        sl = slice(n * chunk, (n + 1) * chunk)
        qc, kc, vc = (t[sl].float().transpose(0, 1) for t in (q, k, v))   # [H,L,*]
        G = log_a[sl].float().transpose(0, 1).cumsum(-1)                   # [H,L]
        decay = torch.exp(G[:, :, None] - G[:, None, :]).tril()
        attn = (qc @ kc.transpose(-1, -2)) * decay
        o = attn @ vc + (qc * torch.exp(G)[..., None]) @ M
        M = torch.exp(G[:, -1])[:, None, None] * M + (kc * torch.exp(G[:, -1:] - G)[..., None]).transpose(-1, -2) @ vc
        outs.append(o.transpose(0, 1))
        states.append(M.clone())
        if reset_after is not None and bool(reset_after[n]):
            M = torch.zeros_like(M)
    return torch.cat(outs), torch.stack(states), M
