"""How a token weighs the cached checkpoints against the online memory.

Scores are `r = <u_t, s> / sqrt(dk)` for every visible cached segment and for the online one.
`grm`/`soup` take a softmax over all of them; `ssc` keeps only the `top_k` best cached segments
(the online memory always takes part) before the softmax. `residual` and `none` have no scores.

Plain torch, kept with the kernels: the cached read-out's reference (`mckernels.cached_readout`)
gates with it, and kernels import nothing above them; the model's mixer imports it from here.
"""

from __future__ import annotations

import torch


def ssc_topk(scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top_k` best cached scores along the last dim -> (values, indices). Ties go to the
    earliest segment (a stable sort; `topk` leaves them unspecified), as in the Triton kernel."""
    values, index = scores.sort(dim=-1, descending=True, stable=True)
    k = min(top_k, scores.shape[-1])
    return values[..., :k], index[..., :k]


def gate_weights(
    cached_scores: torch.Tensor,
    online_score: torch.Tensor,
    visible: torch.Tensor | None,
    aggregation: str,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax gates over cached segments and the online one.

    cached_scores [..., n]; online_score [...]; visible: bool mask broadcastable to
    cached_scores (None = all visible). Returns (g_cached [..., n], g_online [...]); hidden and
    (for ssc) unselected segments get exactly zero weight.
    """
    scores = cached_scores
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    if aggregation == "ssc" and scores.shape[-1] > top_k:
        values, index = ssc_topk(scores, top_k)
        scores = torch.full_like(scores, float("-inf")).scatter(-1, index, values)
    gates = torch.softmax(torch.cat([scores, online_score[..., None]], dim=-1), dim=-1)
    return gates[..., :-1], gates[..., -1]
