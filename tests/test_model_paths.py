"""The three execution paths agree: naive == forward == prefill(any split) + decode."""

import itertools
import random

import pytest
import torch

import models
from tests.helpers import max_err, same_weights, tiny_model, tokens

COMBOS = [("mcserve", *combo) for combo in itertools.product(models.MEMORIES, models.AGGREGATIONS, models.BOUNDARIES)]
COMBOS += [(arch, memory, aggregation, boundary)  # Mamba2's SSD is a gla memory, GDN's the delta rule
           for arch, memory in (("mamba2", "gla"), ("gated_deltanet", "delta"))
           for aggregation, boundary in itertools.product(models.AGGREGATIONS, models.BOUNDARIES)]
TOL = 1e-4


def run_split(model, toks, prefill_cuts, decode_from):
    """Prefill toks[:, :decode_from] in pieces cut at `prefill_cuts`, then decode the rest."""
    state = model.new_state(toks.shape[0])
    outs, start = [], 0
    for cut in sorted(prefill_cuts) + [decode_from]:
        if cut > start:
            outs.append(model.prefill(toks[:, start:cut], state))
            start = cut
    outs += [model.decode(toks[:, t], state)[:, None] for t in range(decode_from, toks.shape[1])]
    return torch.cat(outs, dim=1), state


def assert_same_state(a, b):
    """Every tensor of the two states (checkpoints, summaries, conv tails...) agrees."""
    for layer_a, layer_b in zip(a.layers, b.layers):
        tb = layer_b.tensors()
        for name, t in layer_a.tensors().items():
            assert t.shape == tb[name].shape and max_err(t, tb[name]) < TOL, name


@pytest.mark.parametrize("arch,memory,aggregation,boundary", COMBOS)
@torch.no_grad()
def test_paths_agree(arch, memory, aggregation, boundary):
    model = tiny_model(arch=arch, memory=memory, aggregation=aggregation, boundary=boundary)
    toks = tokens(batch=3, length=27)  # segment 5: 5 full segments and a partial one
    reference = model.naive_forward(toks)
    assert max_err(model(toks), reference) < TOL
    whole = model.new_state(3)
    model.prefill(toks, whole)
    rng = random.Random(f"{arch}{memory}{aggregation}{boundary}")
    for _ in range(3):
        decode_from = rng.randint(1, 26)
        cuts = rng.sample(range(1, decode_from), k=min(3, decode_from - 1))
        logits, state = run_split(model, toks, cuts, decode_from)
        assert max_err(logits, reference) < TOL, (cuts, decode_from)
        assert_same_state(state, whole)
        assert state.num_tokens == 27
        assert state.num_checkpoints == 5  # `none` keeps them too (restart points), and never reads them


@pytest.mark.parametrize("memory,aggregation,segment_size",
                         [("gla", "grm", 80), ("delta", "ssc", 80), ("linear", "residual", 67),
                          ("delta", "soup", 67)])
@torch.no_grad()
def test_paths_agree_several_chunks_per_segment(memory, aggregation, segment_size):
    # segment 80 runs in chunks of 40; segment 67 (prime) in one chunk per segment.
    model = tiny_model(memory=memory, aggregation=aggregation, segment_size=segment_size)
    toks = tokens(batch=2, length=3 * segment_size + 11, seed=1)
    reference = model.naive_forward(toks)
    assert max_err(model(toks), reference) < TOL
    logits, _ = run_split(model, toks, [segment_size // 2 + 3, 2 * segment_size + 1], 3 * segment_size)
    assert max_err(logits, reference) < TOL


@torch.no_grad()
def test_memory_caching_changes_the_output():
    """Guards the agreement tests against a cached read-out that is silently zero."""
    toks = tokens(batch=2, length=20)
    for memory in models.MEMORIES:
        base = tiny_model(memory=memory, aggregation="grm")
        plain = same_weights(base, aggregation="none")
        late = slice(6, None)  # after the first checkpoint
        assert max_err(base(toks)[:, late], plain(toks)[:, late]) > 1e-2


def test_bad_token_input_is_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match="token ids must be in"):
        model(torch.tensor([[0, 61]]))
    with pytest.raises(ValueError, match="shape"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="batch"):
        model.prefill(tokens(2, 3), model.new_state(3))
    with pytest.raises(ValueError, match="one token"):
        model.decode(tokens(2, 3), model.new_state(2))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 3))
