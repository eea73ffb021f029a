"""Sampler: each filter and penalty does what its name says; logprobs are the model's."""

import math

import pytest
import torch

from engine.params import SamplingError, SamplingParams
from engine.sampler import apply_penalties, filter_logits, make_generator, sample

LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))


def kept(params):
    return torch.isfinite(filter_logits(LOGITS, params)).nonzero().flatten().tolist()


def test_top_k_top_p_min_p_keep_the_right_tokens():
    assert kept(SamplingParams(top_k=2)) == [0, 1]
    assert kept(SamplingParams(top_p=0.7)) == [0, 1]        # 0.5 < 0.7, then 0.75 >= 0.7: stop
    assert kept(SamplingParams(top_p=0.75)) == [0, 1]       # the smallest set with mass >= top_p
    assert kept(SamplingParams(top_p=0.8)) == [0, 1, 2]
    assert kept(SamplingParams(min_p=0.2)) == [0, 1, 2]     # >= 0.2 * 0.5 = 0.1
    assert kept(SamplingParams(top_k=3, min_p=0.4)) == [0, 1]


def test_greedy_and_seeded_sampling():
    assert sample(LOGITS, SamplingParams(temperature=0.0), None).token == 0
    params = SamplingParams(temperature=1.0, seed=3)
    draws = [sample(LOGITS, params, make_generator(params)).token for _ in range(2)]
    assert draws[0] == draws[1]
    many = [sample(LOGITS, SamplingParams(), torch.Generator().manual_seed(i)).token for i in range(400)]
    assert abs(many.count(0) / 400 - 0.5) < 0.1  # follows the distribution


def test_penalties():
    base = torch.zeros(5)
    out = apply_penalties(base, SamplingParams(presence_penalty=1.0, frequency_penalty=0.5), [4], [1, 1, 2])
    assert out.tolist() == [0.0, -2.0, -1.5, 0.0, 0.0]     # prompt tokens are not penalised
    logits = torch.tensor([2.0, -2.0, 1.0, 0.0, 0.0])
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), [0], [1])
    assert out.tolist() == [1.0, -4.0, 1.0, 0.0, 0.0]       # seen: positive / 2, negative * 2


@pytest.mark.parametrize("params", [SamplingParams(temperature=5e-324), SamplingParams(repetition_penalty=5e-324),
                                    SamplingParams(top_p=5e-324),
                                    SamplingParams(temperature=1e-4, repetition_penalty=5e-324, top_p=0.5, min_p=0.5)])
def test_extreme_parameters_still_sample(params):
    # a tiny temperature or repetition penalty once overflowed the logits to inf (or divided
    # them by a float32 0), a tiny top_p dropped every token: NaN probabilities, a failed
    # engine step for the whole batch
    logits = LOGITS + 5.0  # positive, as the repetition penalty divides only those
    assert sample(logits, params, torch.Generator().manual_seed(0), [0, 1], []).token in (0, 1)
    assert sample(LOGITS, SamplingParams(temperature=5e-324), torch.Generator().manual_seed(0)).token == 0


def test_logprobs_are_the_models_own():
    s = sample(LOGITS, SamplingParams(temperature=0.0, logprobs=2, top_k=1), None)
    assert s.token == 0 and math.isclose(s.logprob, math.log(0.5), rel_tol=1e-5)
    assert [t for t, _ in s.top_logprobs] == [0, 1]
    assert math.isclose(s.top_logprobs[1][1], math.log(0.25), rel_tol=1e-5)


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=3.0), dict(top_p=0.0), dict(top_k=-1),
                                 dict(min_p=1.0), dict(presence_penalty=3.0), dict(repetition_penalty=0.0),
                                 dict(logprobs=21), dict(stop=("",))])
def test_out_of_range_parameters_are_named(bad):
    with pytest.raises(SamplingError, match=list(bad)[0]):
        SamplingParams(**bad)
