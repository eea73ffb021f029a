"""Sampling parameters of a request: a validated dataclass (no torch, so bookkeeping can use it)."""

from __future__ import annotations

from dataclasses import dataclass, field


class SamplingError(ValueError):
    """A sampling parameter is out of range; the message names it."""


CONSTRAINT_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar", "lark")


@dataclass(frozen=True)
class Constraint:
    """What the output must match (structured outputs): `spec` is a JSON schema's text, a regex,
    a JSON list of choices, a grammar (Lark or GBNF) or a Lark grammar; json_object needs none."""
    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise SamplingError(f"structured output kind must be one of {list(CONSTRAINT_KINDS)}, got {self.kind!r}")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                 # 0: off
    min_p: float = 0.0             # 0: off
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI: subtract once per token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the output
    repetition_penalty: float = 1.0  # HF/vLLM: divide positive (multiply negative) logits of seen tokens
    stop: tuple[str, ...] = ()     # stop strings (not included in the output)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    logprobs: int | None = None    # return the chosen token's logprob and this many alternatives
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), OpenAI's logit_bias
    constraint: Constraint | None = None            # structured outputs: decode under a grammar

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, ">= 1"),
            ("temperature", 0.0 <= self.temperature <= 2.0, "in [0, 2]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("top_k", self.top_k >= 0, ">= 0 (0 turns it off)"),
            ("min_p", 0.0 <= self.min_p < 1.0, "in [0, 1)"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "in (0, 10]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "in [0, 20]"),
            ("seed", self.seed is None or -2**63 <= self.seed < 2**63, "a 64-bit signed integer"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise SamplingError(f"'{name}' must be {rule}, got {getattr(self, name)!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError("'stop' must be non-empty strings")
        if any(not -100.0 <= bias <= 100.0 for _, bias in self.logit_bias):
            raise SamplingError("'logit_bias' values must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        # Below 1e-5 (vLLM's cut too) sampling is argmax in all but name, and a temperature
        # under float32's range would divide the logits by 0.
        return self.temperature < 1e-5
