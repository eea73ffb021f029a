"""Needle in a haystack: a number planted at a chosen depth of filler text, asked for at the end.

    <filler ...> The magic number is 48213. <... filler> What is the magic number? The magic number is| 48213

The filler is a public-domain excerpt of Moby Dick shipped with the package (`data/haystack.txt`),
cut at a random offset; the needle goes in at `depth` (0 = the start, 1 = just before the
question). Every example is exactly `seq_len` tokens including its answer, so they batch without
padding. A model answers right when its greedy continuation is the number's tokens exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models.eval.mqar import IGNORE
from models.tokenizer import Tokenizer

HAYSTACK = Path(__file__).parent / "data" / "haystack.txt"
NEEDLE = " The magic number is {}."
QUESTION = " What is the magic number? The magic number is"


@dataclass(frozen=True)
class NeedleExample:
    prompt: list[int]
    answer: list[int]
    number: int
    depth: float


class NeedleTask:
    def __init__(self, tokenizer: Tokenizer, digits: int = 5, haystack: Path = HAYSTACK):
        self.tokenizer, self.digits = tokenizer, digits
        self.filler = tokenizer.encode(haystack.read_text())
        self.question = tokenizer.encode(QUESTION)

    def example(self, seq_len: int, depth: float, generator: torch.Generator) -> NeedleExample:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        low = 10 ** (self.digits - 1)
        number = int(torch.randint(low, 10 * low, (1,), generator=generator))
        needle = self.tokenizer.encode(NEEDLE.format(number))
        answer = self.tokenizer.encode(f" {number}")
        budget = seq_len - len(needle) - len(self.question) - len(answer)
        if budget < 1:
            raise ValueError(f"seq_len {seq_len} leaves no room for filler")
        start = int(torch.randint(0, len(self.filler) - budget, (1,), generator=generator))
        filler = self.filler[start:start + budget]
        cut = round(depth * budget)
        prompt = filler[:cut] + needle + filler[cut:] + self.question
        return NeedleExample(prompt, answer, number, depth)

    def batch(self, seq_len: int, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch at uniform random depths: (inputs, targets) with only the answer scored."""
        inputs, targets = [], []
        for _ in range(batch):
            depth = float(torch.rand((), generator=generator))
            ex = self.example(seq_len, depth, generator)
            full = ex.prompt + ex.answer
            inputs.append(full[:-1])
            targets.append([IGNORE] * (len(ex.prompt) - 1) + ex.answer)
        return torch.tensor(inputs), torch.tensor(targets)


@dataclass(frozen=True)
class NeedleMixture:
    """Training batches over several haystack lengths, ~`tokens_per_batch` tokens each."""
    task: NeedleTask
    lengths: tuple[int, ...]
    tokens_per_batch: int = 4096

    def __call__(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = self.lengths[int(torch.randint(len(self.lengths), (1,), generator=generator))]
        return self.task.batch(seq_len, max(1, self.tokens_per_batch // seq_len), generator)
