"""Plain-torch reference of the fused decode step (same signature as the Triton kernel).

For each batch row b whose slot `slot_ids[b]` is not -1, update that slot's online memory in
place and read it out:

    linear/gla:  M = a M + k v^T
    delta:       M = a (M - b k (k^T M)) + b k v^T
    o = M^T q

state [S,H,dk,dv] fp32; q, k [B,H,dk]; v [B,H,dv]; log_a [B,H] (zeros for linear); beta [B,H]
(delta only, else None). Returns o [B,H,dv] (zeros for padded rows).
"""

from __future__ import annotations

import torch


def decode_step_ref(state: torch.Tensor, slot_ids: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, log_a: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
    out = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    live = (slot_ids >= 0).nonzero().flatten()
    if live.numel() == 0:
        return out
    slots = slot_ids[live].long()
    M = state[slots]                                   # [n,H,dk,dv]
    qf, kf, vf = q[live].float(), k[live].float(), v[live].float()
    a = torch.exp(log_a[live].float())[..., None, None]
    if beta is None:
        M = a * M + kf[..., :, None] * vf[..., None, :]
    else:
        b = beta[live].float()[..., None, None]
        recalled = torch.einsum("nhkv,nhk->nhv", M, kf)
        M = a * (M - b * kf[..., :, None] * recalled[..., None, :]) + b * kf[..., :, None] * vf[..., None, :]
    state[slots] = M
    out[live] = torch.einsum("nhkv,nhk->nhv", M, qf)
    return out
