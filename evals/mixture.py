"""Weighted choice of one shape per training batch, shared by the MQAR and needle mixtures."""

from __future__ import annotations

import torch


def check_weights(weights: tuple[float, ...] | None, count: int, per: str) -> None:
    """Refuse weights that are not one non-negative number per `per`, or all zero (None = equal)."""
    if weights is not None and (len(weights) != count or min(weights) < 0 or sum(weights) <= 0):
        raise ValueError(f"weights must be one non-negative number per {per}, not all zero: {weights}")


def draw(weights: tuple[float, ...] | None, count: int, generator: torch.Generator) -> int:
    """Index of the shape for this batch, drawn with `weights` (equal when None)."""
    probabilities = torch.tensor(weights or [1.0] * count, dtype=torch.float64)
    return int(torch.multinomial(probabilities, 1, generator=generator))
