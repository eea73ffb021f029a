"""Needle in a haystack: examples have the exact length asked for, the needle sits at the
requested depth, only the answer is scored, and the engine's answers are the model's own greedy
continuation (so the grid scores the server's generation path, not a copy of it)."""

import re

import pytest
import torch

from evals.grid_tasks import BUNDLED_TOKENIZER
from evals.mqar import IGNORE
from evals.needle import NeedleMixture, NeedleTask
from evals.needle_eval import answers_by_engine, answers_by_greedy_loop, needle_examples, needle_scores
from models.tokenizer import Tokenizer
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def task():
    return NeedleTask(Tokenizer.from_file(BUNDLED_TOKENIZER))


@pytest.mark.parametrize("seq_len,depth", [(64, 0.0), (128, 0.5), (256, 1.0)])
def test_example_has_the_needle_at_its_depth_and_the_exact_length(task, seq_len, depth):
    ex = task.example(seq_len, depth, torch.Generator().manual_seed(3))
    assert len(ex.prompt) + len(ex.answer) == seq_len
    text = task.tokenizer.decode(ex.prompt)
    key = next(k for k in task.keys if f"magic number for {k} is {ex.number}." in text)
    needle = f" The magic number for {key} is {ex.number}."
    question = f" What is the magic number for {key}? The magic number for {key} is"
    assert text.count(needle) == 1 and text.endswith(question)
    assert task.tokenizer.decode(ex.answer) == f" {ex.number}" and len(str(ex.number)) == task.digits
    filler_chars = len(text) - len(needle) - len(question)
    where = text.index(needle) / max(1, filler_chars)
    assert abs(where - depth) < 0.1


def test_bad_depth_and_too_short_haystack_are_refused(task):
    with pytest.raises(ValueError, match="depth"):
        task.example(128, 1.5, torch.Generator())
    with pytest.raises(ValueError, match="no room"):
        task.example(20, 0.5, torch.Generator())


def test_training_haystack_asks_for_every_needle_and_scores_only_the_answers(task):
    generator = torch.Generator().manual_seed(0)
    counts = set()
    for _ in range(20):
        inputs, targets = task.training_example(512, generator)
        assert len(inputs) == len(targets) == 511
        text = task.tokenizer.decode(inputs)
        planted = {key: int(n) for key, n in re.findall(r"The magic number for (\w+) is (\d+)\.", text)}
        asked = re.findall(r"What is the magic number for (\w+)\?", text)
        assert sorted(asked) == sorted(planted) and 1 <= len(planted) <= task.max_training_needles(512)
        counts.add(len(planted))
        scored = [t for t in range(len(targets)) if targets[t] != IGNORE]
        assert all(inputs[t + 1] == targets[t] for t in scored[:-1])       # teacher forcing
        assert scored[-1] == len(targets) - 1                                # the last answer closes it
        answers = task.tokenizer.decode([targets[t] for t in scored])
        assert sorted(answers.split()) == sorted(str(n) for n in planted.values())
    assert len(counts) > 1                                                   # the number of needles varies


def test_training_mixture_fills_the_token_budget(task):
    inputs, targets = NeedleMixture(task, (128, 256), tokens_per_batch=512)(torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape and inputs.shape[0] * (inputs.shape[1] + 1) == 512
    assert (targets != IGNORE).any(dim=1).all()


def test_engine_answers_are_the_models_greedy_continuation(task):
    model = tiny_model(vocab_size=task.tokenizer.vocab_size, aggregation="grm", segment_size=16)
    examples = needle_examples(task, [96, 160], [0.0, 1.0], per_cell=2)
    assert answers_by_engine(model, examples) == answers_by_greedy_loop(model, examples)
    records = needle_scores(model, examples)
    assert [r["seq_len"] for r in records] == [96] * 4 + [160] * 4
    assert all(isinstance(r["correct"], bool) for r in records)


def test_mixture_draws_lengths_by_weight_and_refuses_bad_weights(task):
    mixture = NeedleMixture(task, (64, 128), tokens_per_batch=256, weights=(1, 0))
    assert all(mixture(torch.Generator().manual_seed(s))[0].shape[1] == 63 for s in range(5))
    for weights in [(1,), (1, -1), (0, 0)]:
        with pytest.raises(ValueError, match="weights"):
            NeedleMixture(task, (64, 128), weights=weights)
    with pytest.raises(ValueError, match="at least one length"):
        NeedleMixture(task, ())
