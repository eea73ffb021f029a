"""The recall grid's two tasks as the grid uses them: the vocabulary its models are built for,
the training mixture, and the scores of a trained model.

    task = grid_task("mqar", grid)
    model = build_model(name, task.vocab_size, grid)
    train_on_task(model, task.mixture(), ...)
    task.scores(model, device)  # {"accuracy": {"256": ..., ...}, ...}
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from evals.mqar import MQARConfig, MQARMixture, mqar_batch
from evals.needle import NeedleMixture, NeedleTask
from evals.task_train import task_accuracy
from models import default_model_path
from models.tokenizer import Tokenizer

if TYPE_CHECKING:
    from evals.recall import GridConfig

BUNDLED_TOKENIZER = default_model_path() / "tokenizer.json"  # the weights ship inside `models`


class MQARGridTask:
    """MQAR over the grid's vocabulary: trained on the warm-up shapes and every length, scored on
    held-out batches at each length."""

    def __init__(self, grid: GridConfig):
        self.grid = grid
        self.vocab_size = grid.vocab_size

    def mixture(self) -> MQARMixture:
        g = self.grid
        shapes = tuple(g.warmup_shapes) + tuple(zip(g.lengths, g.pairs))
        return MQARMixture(tuple(MQARConfig(g.vocab_size, n, p) for n, p in shapes), g.tokens_per_batch,
                           tuple(g.mqar_mixture_weights))

    def scores(self, model: nn.Module, device: torch.device) -> dict:
        g = self.grid
        return {"accuracy": {str(t.seq_len): task_accuracy(
            model, lambda gen, t=t: mqar_batch(t, max(1, g.tokens_per_batch // t.seq_len), gen), device,
            batches=g.eval_batches) for t in g.mqar_tasks()}}


class NeedleGridTask:
    """The needle in the bundled model's tokenizer: trained on multi-needle haystacks, scored
    through the engine at every length and depth."""

    def __init__(self, grid: GridConfig):
        self.grid = grid
        self.needle = NeedleTask(Tokenizer.from_file(BUNDLED_TOKENIZER))
        self.vocab_size = self.needle.tokenizer.vocab_size

    def mixture(self) -> NeedleMixture:
        g = self.grid
        lengths = tuple(g.needle_warmup_lengths) + tuple(g.lengths)
        return NeedleMixture(self.needle, lengths, g.needle_tokens_per_batch, tuple(g.needle_mixture_weights))

    def scores(self, model: nn.Module, device: torch.device) -> dict:
        from evals.needle_eval import needle_examples, needle_scores  # imports the engine
        g = self.grid
        records = needle_scores(model, needle_examples(self.needle, list(g.lengths), list(g.depths),
                                                       g.needle_per_cell))
        accuracy = {str(n): mean(r["correct"] for r in records if r["seq_len"] == n) for n in g.lengths}
        by_depth = {f"{n}@{d:g}": mean(r["correct"] for r in records if r["seq_len"] == n and r["depth"] == d)
                    for n in g.lengths for d in g.depths}
        return {"accuracy": accuracy, "by_depth": by_depth}


def grid_task(name: str, grid: GridConfig) -> MQARGridTask | NeedleGridTask:
    return {"mqar": MQARGridTask, "needle": NeedleGridTask}[name](grid)


def mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")
