"""Needle in a haystack: examples have the exact length asked for, the needle sits at the
requested depth, only the answer is scored, and the engine's answers are the model's own greedy
continuation (so the grid scores the server's generation path, not a copy of it)."""

import pytest
import torch

from models.eval.mqar import IGNORE
from models.eval.needle import NeedleMixture, NeedleTask
from models.eval.needle_eval import answers_by_engine, answers_by_greedy_loop, needle_examples, needle_scores
from models.eval.recall import BUNDLED_TOKENIZER
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
    needle = f"The magic number is {ex.number}."
    assert text.count(needle) == 1 and text.endswith("What is the magic number? The magic number is")
    assert task.tokenizer.decode(ex.answer) == f" {ex.number}" and len(str(ex.number)) == task.digits
    filler_chars = len(text) - len(needle) - len(" What is the magic number? The magic number is")
    where = text.index(needle) / max(1, filler_chars)
    assert abs(where - depth) < 0.1


def test_bad_depth_and_too_short_haystack_are_refused(task):
    with pytest.raises(ValueError, match="depth"):
        task.example(128, 1.5, torch.Generator())
    with pytest.raises(ValueError, match="no room"):
        task.example(20, 0.5, torch.Generator())


def test_training_batch_scores_only_the_answer(task):
    inputs, targets = NeedleMixture(task, (64, 128), tokens_per_batch=256)(torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape and inputs.shape[0] * (inputs.shape[1] + 1) == 256
    for x, y in zip(inputs.tolist(), targets.tolist()):
        scored = [t for t in range(len(y)) if y[t] != IGNORE]
        assert scored == list(range(scored[0], len(y)))          # the answer closes the sequence
        assert x[scored[0] + 1:] == y[scored[0]:-1]               # teacher forcing over the answer
        assert task.tokenizer.decode(y[scored[0]:]).strip() in task.tokenizer.decode(x)


def test_engine_answers_are_the_models_greedy_continuation(task):
    model = tiny_model(vocab_size=task.tokenizer.vocab_size, aggregation="grm", segment_size=16)
    examples = needle_examples(task, [96, 160], [0.0, 1.0], per_cell=2)
    assert answers_by_engine(model, examples) == answers_by_greedy_loop(model, examples)
    records = needle_scores(model, examples)
    assert [r["seq_len"] for r in records] == [96] * 4 + [160] * 4
    assert all(isinstance(r["correct"], bool) for r in records)
