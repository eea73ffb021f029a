"""Multi-query associative recall (MQAR), as in the Zoology benchmark (Arora et al., 2023).

A sequence opens with `num_pairs` key-value pairs `k1 v1 k2 v2 ...`, keys drawn without
replacement from the lower half of the vocabulary and values from the upper half. The rest of the
sequence is filler (token 0) in which every key appears once more, as a query, at a position
drawn with a power-law bias towards the start (Zoology's `power_a`): a query far from its pair is
rarer but still present. The target after each query is its value; every other position is
ignored (-100). Accuracy is over the queried values only.

Token ids: 0 = filler, 1 .. V/2-1 = keys, V/2 .. V-1 = values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evals.mixture import check_weights, draw

IGNORE = -100


@dataclass(frozen=True)
class MQARConfig:
    vocab_size: int = 256
    seq_len: int = 256
    num_pairs: int = 16
    power_a: float = 0.01   # query-gap distribution ~ x^(a-1): small a favours short gaps

    def __post_init__(self) -> None:
        keys = self.vocab_size // 2 - 1
        if self.num_pairs < 1 or self.num_pairs > keys:
            raise ValueError(f"num_pairs must be in 1..{keys} for vocab_size {self.vocab_size}, got {self.num_pairs}")
        # Queries go on even offsets of the region after the pairs, each followed by its answer slot.
        if self.seq_len < 4 * self.num_pairs:
            raise ValueError(f"seq_len must be >= 4 * num_pairs = {4 * self.num_pairs}, got {self.seq_len}")


def mqar_batch(config: MQARConfig, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [batch, seq_len], targets [batch, seq_len]); targets[t] is the token after inputs[t]."""
    V, T, P = config.vocab_size, config.seq_len, config.num_pairs
    half = V // 2
    keys = torch.stack([torch.randperm(half - 1, generator=generator)[:P] + 1 for _ in range(batch)])
    values = torch.randint(half, V, (batch, P), generator=generator)
    seq = torch.zeros(batch, T + 1, dtype=torch.long)
    seq[:, 0:2 * P:2], seq[:, 1:2 * P:2] = keys, values
    # Query slots: even offsets in the region after the pairs, chosen without replacement with
    # probability ~ gap^(a-1) (Zoology's power law), so near queries outnumber far ones.
    slots = (T + 1 - 2 * P) // 2
    gaps = torch.arange(1, slots + 1, dtype=torch.float64)
    weights = (config.power_a * gaps ** (config.power_a - 1)).expand(batch, slots)
    chosen = torch.multinomial(weights, P, replacement=False, generator=generator)   # [batch, P]
    query_pos = 2 * P + 2 * chosen
    seq.scatter_(1, query_pos, keys)
    targets = torch.full((batch, T + 1), IGNORE, dtype=torch.long)
    targets.scatter_(1, query_pos + 1, values)
    return seq[:, :T], targets[:, 1:]


@dataclass(frozen=True)
class MQARMixture:
    """Training batches drawn from several MQAR configurations, one per batch, each batch holding
    about `tokens_per_batch` tokens (so short sequences come in bigger batches), as Zoology trains
    on a mixture of lengths and pair counts."""
    tasks: tuple[MQARConfig, ...]
    tokens_per_batch: int = 4096
    weights: tuple[float, ...] | None = None   # relative frequency of each task (default: equal)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("an MQAR mixture needs at least one task")
        if self.tokens_per_batch < max(t.seq_len for t in self.tasks):
            raise ValueError(f"tokens_per_batch {self.tokens_per_batch} is below the longest sequence")
        check_weights(self.weights, len(self.tasks), "task")

    def __call__(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        task = self.tasks[draw(self.weights, len(self.tasks), generator)]
        return mqar_batch(task, self.tokens_per_batch // task.seq_len, generator)


def recall_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of queried values predicted exactly (argmax), over every query in the batch."""
    asked = targets != IGNORE
    return (logits.argmax(-1)[asked] == targets[asked]).float().mean().item()
