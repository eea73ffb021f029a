"""MQAR data: every key is queried once after the pairs, the target is its value, nothing else
is scored; a perfect lookup scores 1 and a constant guess scores near chance."""

import pytest
import torch

from evals.mqar import IGNORE, MQARConfig, MQARMixture, mqar_batch, recall_accuracy


@pytest.mark.parametrize("seq_len,num_pairs", [(64, 4), (256, 16), (257, 64)])
def test_every_query_asks_for_its_value(seq_len, num_pairs):
    config = MQARConfig(vocab_size=256, seq_len=seq_len, num_pairs=num_pairs)
    inputs, targets = mqar_batch(config, 8, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (8, seq_len)
    for x, y in zip(inputs.tolist(), targets.tolist()):
        pairs = dict(zip(x[0:2 * num_pairs:2], x[1:2 * num_pairs:2]))
        assert len(pairs) == num_pairs and all(1 <= k < 128 <= v < 256 for k, v in pairs.items())
        asked = [(x[t], y[t]) for t in range(seq_len) if y[t] != IGNORE]
        assert sorted(k for k, _ in asked) == sorted(pairs) and all(pairs[k] == v for k, v in asked)
        assert all(t >= 2 * num_pairs for t in range(seq_len) if y[t] != IGNORE)
        # Outside the pairs and the queries, the sequence is filler.
        queried = {t for t in range(seq_len) if y[t] != IGNORE}
        assert all(x[t] == 0 for t in range(2 * num_pairs, seq_len) if t not in queried)


def test_accuracy_of_a_perfect_and_a_blind_model():
    config = MQARConfig(vocab_size=64, seq_len=128, num_pairs=8)
    inputs, targets = mqar_batch(config, 16, torch.Generator().manual_seed(1))
    perfect = torch.nn.functional.one_hot(targets.clamp(min=0), 64).float()
    assert recall_accuracy(perfect, targets) == 1.0
    blind = torch.zeros(16, 128, 64)
    blind[..., 40] = 1.0
    assert recall_accuracy(blind, targets) < 0.2


def test_short_gaps_are_more_common_but_far_ones_occur():
    config = MQARConfig(vocab_size=512, seq_len=1024, num_pairs=32)
    _, targets = mqar_batch(config, 64, torch.Generator().manual_seed(2))
    pos = (targets != IGNORE).nonzero()[:, 1].float()
    region = pos - 2 * config.num_pairs
    assert (region < 480).float().mean() > 0.5 and (region > 700).any()


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="num_pairs"):
        MQARConfig(vocab_size=16, num_pairs=10)
    with pytest.raises(ValueError, match="seq_len"):
        MQARConfig(seq_len=32, num_pairs=16)


def test_mixture_draws_each_task_with_its_weight_and_a_fixed_token_budget():
    short, long = MQARConfig(vocab_size=64, seq_len=32, num_pairs=4), MQARConfig(vocab_size=64, seq_len=128, num_pairs=8)
    mixture = MQARMixture((short, long), tokens_per_batch=256, weights=(3.0, 1.0))
    shapes = [tuple(mixture(torch.Generator().manual_seed(i))[0].shape) for i in range(400)]
    assert set(shapes) == {(8, 32), (2, 128)}
    assert 0.65 < shapes.count((8, 32)) / len(shapes) < 0.85
    only_long = MQARMixture((short, long), tokens_per_batch=256, weights=(0.0, 1.0))
    assert all(only_long(torch.Generator().manual_seed(i))[0].shape == (2, 128) for i in range(20))


@pytest.mark.parametrize("kwargs", [dict(tasks=()), dict(tokens_per_batch=16), dict(weights=(1.0,)),
                                    dict(weights=(0.0, 0.0)), dict(weights=(-1.0, 2.0))])
def test_mixture_rejects_bad_settings(kwargs):
    tasks = (MQARConfig(vocab_size=64, seq_len=32, num_pairs=4), MQARConfig(vocab_size=64, seq_len=64, num_pairs=4))
    with pytest.raises(ValueError):
        MQARMixture(**{"tasks": tasks, "tokens_per_batch": 128, **kwargs})
