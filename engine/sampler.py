"""Next-token sampling: penalties, temperature, top-k, top-p, min-p, logprobs, and a per-request
seeded generator.

Greedy decoding (temperature 0) is deterministic; with a seed, sampling is reproducible per
request because each request owns its own `torch.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .params import SamplingParams


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, min-p and top-p masking. logits [V] -> scaled, masked logits."""
    # Scaled from the top logit (the softmax is the same), so that none overflows to inf (NaN in
    # the softmax): one a tiny repetition penalty made the largest float, over a temperature < 1.
    logits = logits.float()
    logits = (logits - logits.max(-1, keepdim=True).values) / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        drop_sorted[..., 0] = False  # even when top_p is under float32's range (it compares as 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> torch.Tensor:
    """OpenAI presence/frequency penalties on generated tokens; the HF/vLLM repetition penalty
    on every token seen (prompt and output)."""
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.shape[-1])
        counts = counts[: logits.shape[-1]].to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        picked = logits[seen]
        logits = logits.clone()
        # Capped at the largest float: a tiny penalty must not make a seen logit inf (NaN later).
        boosted = (picked / params.repetition_penalty).clamp(max=torch.finfo(logits.dtype).max)
        logits[seen] = torch.where(picked > 0, boosted, picked * params.repetition_penalty)
    return logits


def apply_logit_bias(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    if not params.logit_bias:
        return logits
    ids, biases = zip(*params.logit_bias)
    return logits.index_add(-1, torch.tensor(ids, device=logits.device),
                            torch.tensor(biases, dtype=logits.dtype, device=logits.device))


@dataclass
class Sample:
    token: int
    logprob: float | None = None                  # of the chosen token, under the model
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           prompt_ids: list[int] = (), output_ids: list[int] = (), banned: torch.Tensor | None = None) -> Sample:
    """One token from logits [V], never one that `banned` (bool [V], a grammar's) refuses;
    logprobs on request are of the model's own distribution, before any of that steering."""
    logits = logits.float()
    steered = apply_logit_bias(apply_penalties(logits, params, list(prompt_ids), list(output_ids)), params)
    if banned is not None:
        steered = steered.masked_fill(banned, float("-inf"))
    token = sample_next(steered, params, generator)
    if params.logprobs is None:
        return Sample(token)
    logprobs = logits.log_softmax(-1)
    top = logprobs.topk(params.logprobs) if params.logprobs else None
    alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return Sample(token, float(logprobs[token]), alternatives)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from logits [V]."""
    if params.greedy:
        return int(logits.argmax())
    probs = filter_logits(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
