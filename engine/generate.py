"""Single-sequence generation on the model's own prefill/decode path (no engine): the plainest
way to generate, used to check the engine and the bundled model against the model itself."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from models import MCModel

from .params import SamplingParams
from .sampler import make_generator, sample_next


@torch.inference_mode()
def generate_ids(model: MCModel, prompt_ids: list[int], params: SamplingParams,
                 prefill_chunk: int = 2048) -> Iterator[int]:
    """Yield generated token ids until max_tokens or a stop token (which is not yielded)."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    device = model.embed.weight.device
    state = model.new_state(1)
    prompt = torch.tensor([prompt_ids], device=device)
    for start in range(0, prompt.shape[1], prefill_chunk):
        logits = model.prefill(prompt[:, start:start + prefill_chunk], state)[0, -1]
    generator = make_generator(params, device)
    for _ in range(params.max_tokens):
        token = sample_next(logits, params, generator)
        if token in params.stop_token_ids:
            return
        yield token
        logits = model.decode(torch.tensor([token], device=device), state)[0]
