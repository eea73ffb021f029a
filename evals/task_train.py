"""Training on a synthetic task: the project's optimizer and schedule (models.optim) with a loss
masked to the positions the task scores (targets of -100 are ignored).

The model gives `features(tokens)` (final hidden states) and `logits(features)` (the head).
A task is a function `sample(generator) -> (inputs [B,T], targets [B,T])`. The batch of step `s`
comes from a generator seeded by (seed, s), so a run is reproducible from its seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from evals.mqar import IGNORE, recall_accuracy
from models.optim import adamw, cosine_lr, set_lr

Sampler = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TaskTrainConfig:
    steps: int = 1000
    lr: float = 3e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.warmup < 0 or self.grad_clip <= 0:
            raise ValueError(f"need steps >= 1, lr > 0, warmup >= 0, grad_clip > 0: {self}")


@dataclass
class TaskTrainResult:
    steps: int
    seconds: float
    final_loss: float
    losses: list[float]


def masked_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def scored_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`masked_loss(model(inputs), targets)`, with the LM head applied to the scored positions
    only: a needle batch scores ~4% of its tokens, and its 4096-way head was ~40% of a step."""
    scored = targets != IGNORE
    return F.cross_entropy(model.logits(model.features(inputs)[scored]).float(), targets[scored])


def train_on_task(model: nn.Module, sample: Sampler, cfg: TaskTrainConfig, device: torch.device,
                  log: Callable[[int, float], None] | None = None) -> TaskTrainResult:
    """Train `model` in place for `cfg.steps` steps; `log(step, loss)` every 100 steps."""
    model.to(device).train()
    optimizer = adamw(model, cfg.lr, cfg.weight_decay)
    losses, started = [], time.perf_counter()
    for step in range(cfg.steps):
        set_lr(optimizer, cosine_lr(step, cfg.lr, cfg.steps, cfg.warmup, cfg.min_lr_ratio))
        inputs, targets = sample(torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
        loss = scored_loss(model, inputs.to(device), targets.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if log is not None and (step + 1) % 100 == 0:
            log(step + 1, sum(losses[-100:]) / 100)
    model.eval()
    return TaskTrainResult(cfg.steps, time.perf_counter() - started, losses[-1], losses)


@torch.no_grad()
def task_accuracy(model: nn.Module, sample: Sampler, device: torch.device, batches: int = 4,
                  seed: int = 10_000_019) -> float:
    """Recall accuracy on held-out batches (a seed range training never draws from)."""
    model.eval()
    scores = []
    for i in range(batches):
        inputs, targets = sample(torch.Generator().manual_seed(seed + i))
        scores.append(recall_accuracy(model(inputs.to(device)), targets.to(device)))
    return sum(scores) / len(scores)
