"""Needle in a haystack: a keyed number planted at a chosen depth of filler text, asked for at the end.

    <filler ...> The magic number for ocean is 48213. <... filler>
    What is the magic number for ocean? The magic number for ocean is| 48213

The filler is a public-domain excerpt of Moby Dick shipped with the package (`data/haystack.txt`),
cut at a random offset; the needle goes in at `depth` (0 = the start, 1 = just before the
question). Every example is exactly `seq_len` tokens including its answer, so they batch without
padding. A model answers right when its greedy continuation is the number's tokens exactly.

Evaluation plants one needle. Training plants several, under distinct keys at random depths, and
asks for every one of them at the end (RULER's multi-key variant, with all keys queried): a
single needle gives one scored answer per haystack, too little signal for a small model to learn
the copy in a few hundred steps. A haystack of n tokens holds 1 to n/40 needles, so on average
about 40% of it is needles, questions and answers; the rest is filler to be skipped over.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from evals.mixture import check_weights, draw
from evals.mqar import IGNORE
from models.tokenizer import Tokenizer

HAYSTACK = Path(__file__).parent / "data" / "haystack.txt"
NEEDLE = " The magic number for {key} is {number}."
QUESTION = " What is the magic number for {key}? The magic number for {key} is"
ANSWER = " {number}"
# Keys are single tokens of the bundled tokenizer, so no two of them share a last token.
KEYS = ("ocean", "forest", "island", "silver", "paper", "water", "heart", "school", "earth", "house", "queen",
        "crown", "canal", "prison", "steam", "whale", "father", "mother", "brother", "black", "white", "light",
        "field", "night", "blood", "money", "heaven", "truth", "board", "court", "sleep")
TOKENS_PER_TRAINING_NEEDLE = 40   # a needle with its question and answer is ~30 tokens


@dataclass(frozen=True)
class NeedleExample:
    prompt: list[int]
    answer: list[int]
    number: int
    depth: float


@dataclass(frozen=True)
class _Needle:
    key: str
    number: int
    depth: float


class NeedleTask:
    def __init__(self, tokenizer: Tokenizer, digits: int = 5, haystack: Path = HAYSTACK,
                 keys: tuple[str, ...] = KEYS):
        self.tokenizer, self.digits, self.keys = tokenizer, digits, keys
        self.filler = tokenizer.encode(haystack.read_text())

    def example(self, seq_len: int, depth: float, generator: torch.Generator) -> NeedleExample:
        """One needle at `depth`, asked for at the end: the prompt stops where the answer starts."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        needle = self._needles(1, generator, depths=[depth])[0]
        tokens, scored = self._haystack(seq_len, [needle], generator)
        start = scored[0][0]
        return NeedleExample(tokens[:start], tokens[start:], needle.number, depth)

    def max_training_needles(self, seq_len: int) -> int:
        return max(1, min(len(self.keys), seq_len // TOKENS_PER_TRAINING_NEEDLE))

    def training_example(self, seq_len: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
        """(inputs, targets) of length seq_len - 1 with 1..max needles, every answer scored."""
        count = 1 + int(torch.randint(self.max_training_needles(seq_len), (1,), generator=generator))
        tokens, scored = self._haystack(seq_len, self._needles(count, generator), generator)
        targets = [IGNORE] * len(tokens)
        for start, stop in scored:
            targets[start:stop] = tokens[start:stop]
        return tokens[:-1], targets[1:]

    def batch(self, seq_len: int, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = zip(*(self.training_example(seq_len, generator) for _ in range(batch)))
        return torch.tensor(inputs), torch.tensor(targets)

    def _needles(self, count: int, generator: torch.Generator, depths: list[float] | None = None) -> list[_Needle]:
        low = 10 ** (self.digits - 1)
        keys = torch.randperm(len(self.keys), generator=generator)[:count].tolist()
        numbers = torch.randint(low, 10 * low, (count,), generator=generator).tolist()
        if depths is None:
            depths = torch.rand(count, generator=generator).tolist()
        return [_Needle(self.keys[k], n, d) for k, n, d in zip(keys, numbers, depths)]

    def _haystack(self, seq_len: int, needles: list[_Needle], generator: torch.Generator
                  ) -> tuple[list[int], list[tuple[int, int]]]:
        """Filler with the needles at their depths, then a question and answer per needle (in a
        random order): the tokens, and the (start, stop) span of every answer."""
        encode = self.tokenizer.encode
        planted = [(n.depth, encode(NEEDLE.format(key=n.key, number=n.number))) for n in needles]
        order = torch.randperm(len(needles), generator=generator).tolist()
        asked = [(encode(QUESTION.format(key=needles[i].key)), encode(ANSWER.format(number=needles[i].number)))
                 for i in order]
        budget = seq_len - sum(len(t) for _, t in planted) - sum(len(q) + len(a) for q, a in asked)
        if budget < 1:
            raise ValueError(f"seq_len {seq_len} leaves no room for filler")
        start = int(torch.randint(0, len(self.filler) - budget, (1,), generator=generator))
        filler = self.filler[start:start + budget]
        tokens, cut = [], 0
        for depth, needle in sorted(planted, key=lambda p: p[0]):
            at = round(depth * budget)
            tokens += filler[cut:at] + needle
            cut = at
        tokens += filler[cut:]
        spans = []
        for question, answer in asked:
            tokens += question
            spans.append((len(tokens), len(tokens) + len(answer)))
            tokens += answer
        return tokens, spans


@dataclass(frozen=True)
class NeedleMixture:
    """Training batches over several haystack lengths, ~`tokens_per_batch` tokens each (so short
    haystacks come in bigger batches: more answers per batch to learn the copy from)."""
    task: NeedleTask
    lengths: tuple[int, ...]
    tokens_per_batch: int = 4096
    weights: tuple[float, ...] | None = None   # relative frequency of each length (default: equal)

    def __post_init__(self) -> None:
        if not self.lengths:
            raise ValueError("a needle mixture needs at least one length")
        check_weights(self.weights, len(self.lengths), "length")

    def __call__(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = self.lengths[draw(self.weights, len(self.lengths), generator)]
        return self.task.batch(seq_len, max(1, self.tokens_per_batch // seq_len), generator)
