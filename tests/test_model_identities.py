"""The identities of docs/design.md section 1, checked on every path."""

import pytest
import torch

import models
from tests.helpers import max_err, same_weights, tiny_model, tokens

TOL = 1e-4


def all_paths(model, toks):
    state = model.new_state(toks.shape[0])
    half = toks.shape[1] // 2
    split = torch.cat([model.prefill(toks[:, :half], state)] +
                      [model.decode(toks[:, t], state)[:, None] for t in range(half, toks.shape[1])], 1)
    return {"naive": model.naive_forward(toks), "forward": model(toks), "split": split}


def assert_same_on_all_paths(a, b, toks):
    pa, pb = all_paths(a, toks), all_paths(b, toks)
    for path in pa:
        assert max_err(pa[path], pb[path]) < TOL, path


@pytest.mark.parametrize("memory", models.MEMORIES)
@torch.no_grad()
def test_grm_equals_soup_for_matrix_memories(memory):
    grm = tiny_model(memory=memory, aggregation="grm")
    soup = same_weights(grm, aggregation="soup")
    assert_same_on_all_paths(grm, soup, tokens(2, 23))


@pytest.mark.parametrize("memory", models.MEMORIES)
def test_grm_and_soup_train_identically(memory):
    """The training path computes soup exactly as grm, to the bit: the recall grid trains grm
    once and scores its weights as soup too (evals/recall.py, TRAINS_AS)."""
    grm = tiny_model(memory=memory, aggregation="grm")
    soup = same_weights(grm, aggregation="soup")
    toks = tokens(2, 23)
    out_grm, out_soup = grm(toks), soup(toks)
    assert torch.equal(out_grm, out_soup)
    out_grm.square().mean().backward()
    out_soup.square().mean().backward()
    for (name, a), b in zip(grm.named_parameters(), soup.parameters()):
        assert torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize("memory", models.MEMORIES)
@torch.no_grad()
def test_ssc_with_enough_top_k_equals_grm(memory):
    grm = tiny_model(memory=memory, aggregation="grm")
    toks = tokens(2, 23)  # 4 checkpoints
    ssc = same_weights(grm, aggregation="ssc", ssc_top_k=4)
    assert_same_on_all_paths(grm, ssc, toks)
    # ...and with fewer selected segments it really is a different model.
    ssc1 = same_weights(grm, aggregation="ssc", ssc_top_k=1)
    assert max_err(ssc1(toks), grm(toks)) > 1e-3


@pytest.mark.parametrize("memory", models.MEMORIES)
@pytest.mark.parametrize("aggregation", ["residual", "grm", "soup", "ssc"])
@torch.no_grad()
def test_one_segment_makes_every_aggregation_none(memory, aggregation):
    toks = tokens(2, 17)
    mc = tiny_model(memory=memory, aggregation=aggregation, segment_size=17)
    plain = same_weights(mc, aggregation="none")
    assert_same_on_all_paths(mc, plain, toks)


@torch.no_grad()
def test_linear_reset_residual_equals_linear_none():
    toks = tokens(2, 23)
    residual = tiny_model(memory="linear", aggregation="residual", boundary="reset")
    plain = same_weights(residual, aggregation="none", boundary="carry")
    assert_same_on_all_paths(residual, plain, toks)
