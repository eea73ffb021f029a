"""The optimizer and learning-rate schedule every trainer in the project uses: AdamW (no decay on
embeddings, norms and biases) with linear warm-up and cosine decay to a floor."""

from __future__ import annotations

import math

import torch
from torch import nn


def cosine_lr(step: int, lr: float, steps: int, warmup: int, min_lr_ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * cosine)


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decayed = lambda name, p: p.dim() >= 2 and "embed" not in name
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if decayed(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in named if not decayed(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
