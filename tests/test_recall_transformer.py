"""The transformer baseline of the recall evaluation: causal, rotary, and able to learn MQAR."""

import pytest
import torch

from evals.mqar import MQARConfig, mqar_batch, recall_accuracy
from evals.transformer import Transformer, TransformerConfig, rotary


def test_attention_is_causal():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=32, d_model=32, n_heads=2, mlp_hidden=48)).eval()
    x = torch.randint(0, 32, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 32
    with torch.no_grad():
        assert torch.allclose(model(x)[0, :8], model(y)[0, :8], atol=1e-6)
        assert not torch.allclose(model(x)[0, 8:], model(y)[0, 8:], atol=1e-3)


def test_without_the_short_conv_it_is_causal_too_and_bad_widths_are_refused():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=32, d_model=32, n_heads=2, mlp_hidden=48, conv_size=0)).eval()
    assert not any("conv" in name for name, _ in model.named_parameters())
    x = torch.randint(0, 32, (1, 12))
    y = x.clone()
    y[0, 6:] = (y[0, 6:] + 1) % 32
    with torch.no_grad():
        assert torch.allclose(model(x)[0, :6], model(y)[0, :6], atol=1e-6)
    for width in (-1, 1):
        with pytest.raises(ValueError, match="conv_size"):
            TransformerConfig(conv_size=width)


def test_fixed_state_is_the_conv_tail():
    c = TransformerConfig(d_model=64, n_layers=3, conv_size=4)
    assert Transformer(c).fixed_state_bytes() == 3 * 3 * 3 * 64 * 4
    assert Transformer(TransformerConfig(d_model=64, conv_size=0)).fixed_state_bytes() == 0


def test_rotary_scores_depend_on_offset_only():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)
    T = 10
    qs, ks = rotary(q.expand(1, 1, T, 8).clone(), 100.0), rotary(k.expand(1, 1, T, 8).clone(), 100.0)
    scores = qs[0, 0] @ ks[0, 0].T
    assert torch.allclose(scores[3, 1], scores[7, 5], atol=1e-5) and torch.allclose(scores[9, 9], scores[0, 0], atol=1e-5)


def test_transformer_learns_to_read_the_context():
    """After a few seconds of training it answers from the values in its context (~1/3 right,
    against 1/16 by chance); full recall needs longer training (the recall grid of issue 8)."""
    torch.manual_seed(0)
    task = MQARConfig(vocab_size=32, seq_len=32, num_pairs=4)
    model = Transformer(TransformerConfig(vocab_size=32, d_model=64, n_heads=4, mlp_hidden=128))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        x, y = mqar_batch(task, 32, gen)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = mqar_batch(task, 64, torch.Generator().manual_seed(99))
    with torch.no_grad():
        assert recall_accuracy(model(x), y) > 0.2
