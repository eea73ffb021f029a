"""Plain-torch reference of the cached read-out (same signature as the Triton kernel).

For each sequence b and head h, over its checkpoints `tables[b][:lengths[b]]` in the pool:

    r_i = <u, s_i> * scale,  r_online given (the online segment's score)
    residual:  y = sum_i C_i^T q,                              g_online = 1
    grm/soup:  g = softmax(r_1..r_n, r_online), y = sum_i g_i C_i^T q, g_online = g_{n+1}
    ssc:       as grm over the top_k cached scores only (all of them if n <= top_k)

Returns (y_cached [B,H,dv] fp32, g_online [B,H] fp32); the caller adds g_online * M^T q.
pool [N,H,dk,dv] (fp32 or bf16, read in fp32), summaries [N,H,dk], tables [B,max_n] int,
lengths [B], q, u [B,H,dk], r_online [B,H].
"""

from __future__ import annotations

import torch

from mckernels.aggregation import gate_weights

MODES = ("residual", "grm", "soup", "ssc")


def cached_readout_ref(pool, summaries, tables, lengths, q, u, r_online, mode: str, top_k: int, scale: float):
    B, H, _ = q.shape
    dv = pool.shape[-1]
    y = torch.zeros(B, H, dv, dtype=torch.float32, device=q.device)
    g_online = torch.ones(B, H, dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            continue
        blocks = tables[b, :n].long()
        C = pool[blocks].float().transpose(0, 1)                      # [H,n,dk,dv]
        reads = torch.einsum("hnkv,hk->hnv", C, q[b].float())           # [H,n,dv]
        if mode == "residual":
            y[b] = reads.sum(1)
            continue
        r = torch.einsum("nhk,hk->hn", summaries[blocks].float(), u[b].float()) * scale
        g_cached, g_on = gate_weights(r, r_online[b].float(), None, "ssc" if mode == "ssc" else "grm", top_k)
        y[b] = torch.einsum("hn,hnv->hv", g_cached, reads)
        g_online[b] = g_on
    return y, g_online
