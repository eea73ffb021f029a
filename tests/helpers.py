"""Tiny random models for fast tests."""

from __future__ import annotations

import torch

import models

TINY = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=2, dk=6, dv=10, mlp_hidden=40,
            segment_size=5, conv_size=3, ssc_top_k=2)


# What each architecture needs on top of TINY (tests that run on every one parametrise over these).
ARCHS = {"mcserve": {}, "mamba2": dict(arch="mamba2", memory="gla", mlp="none", n_groups=2, conv_bias=True),
         "gated_deltanet": dict(arch="gated_deltanet", memory="delta", n_groups=1)}


def tiny_model(seed: int = 0, arch: str = "mcserve", **overrides) -> models.MCModel:
    """A tiny model whose weights are loud enough that every part of the state matters."""
    model = models.build({**TINY, **ARCHS[arch], **overrides}, seed=seed)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if p.dim() == 2 and "decay" not in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.15)
    model.invalidate_fingerprint()
    return model.eval()


def same_weights(model: models.MCModel, **overrides) -> models.MCModel:
    """A model with another config that shares every weight the two have in common."""
    other = models.build({**model.config.to_dict(), **overrides})
    ours = model.state_dict()
    # The connector u is the last block of rows of in_proj, so a model without it shares a prefix.
    shared = {k: ours[k][: v.shape[0]] for k, v in other.state_dict().items() if k in ours}
    other.load_state_dict(shared, strict=False)
    other.invalidate_fingerprint()
    return other.eval()


def tokens(batch: int, length: int, seed: int = 0, vocab: int = TINY["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0
