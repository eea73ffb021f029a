"""Sampling parameters of a request: a validated dataclass (no torch, so bookkeeping can use it)."""

from __future__ import annotations

from dataclasses import dataclass, field


class SamplingError(ValueError):
    """A sampling parameter is out of range; the message names it."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0          # 0: off
    min_p: float = 0.0      # 0: off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, ">= 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("top_k", self.top_k >= 0, ">= 0 (0 turns it off)"),
            ("min_p", 0.0 <= self.min_p < 1.0, "in [0, 1)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise SamplingError(f"'{name}' must be {rule}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
