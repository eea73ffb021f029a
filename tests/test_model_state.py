"""Recurrent state: exact save/load, resumed in a fresh process, and guarded against misuse."""

import subprocess
import sys
import textwrap

import pytest
import torch

import models
from tests.helpers import max_err, tiny_model, tokens


@pytest.mark.parametrize("memory,aggregation", [("gla", "grm"), ("delta", "ssc"), ("linear", "residual")])
@torch.no_grad()
def test_state_saved_mid_segment_resumes_in_fresh_process(tmp_path, memory, aggregation):
    model = tiny_model(memory=memory, aggregation=aggregation, vocab_size=260)
    model.tokenizer = models.byte_tokenizer()  # 259 tokens
    toks = tokens(2, 30)
    uninterrupted = model(toks)

    state = model.new_state(2)
    model.prefill(toks[:, :13], state)  # 13 = 2 segments of 5, then 3 tokens into the third
    models.save(model, tmp_path / "model")
    model.save_state(state, tmp_path / "state.safetensors")
    torch.save(toks, tmp_path / "tokens.pt")

    script = textwrap.dedent(f"""
        import torch, models
        model = models.load({str(tmp_path / 'model')!r})
        state = model.load_state({str(tmp_path / 'state.safetensors')!r})
        toks = torch.load({str(tmp_path / 'tokens.pt')!r})
        with torch.no_grad():
            head = model.prefill(toks[:, 13:20], state)
            tail = [model.decode(toks[:, t], state)[:, None] for t in range(20, 30)]
        torch.save(torch.cat([head] + tail, 1), {str(tmp_path / 'out.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    resumed = torch.load(tmp_path / "out.pt")
    assert max_err(resumed, uninterrupted[:, 13:]) < 1e-4


@torch.no_grad()
def test_state_round_trip_is_bit_exact(tmp_path):
    model = tiny_model(aggregation="ssc")
    state = model.new_state(3)
    model.prefill(tokens(3, 12), state)
    model.save_state(state, tmp_path / "s.safetensors")
    loaded = model.load_state(tmp_path / "s.safetensors")
    assert loaded.num_tokens == 12 and loaded.num_checkpoints == 2
    for a, b in zip(state.layers, loaded.layers):
        for name, t in a.tensors().items():
            assert torch.equal(t, b.tensors()[name]), name
    nxt = tokens(3, 1, seed=5)[:, 0]
    assert torch.equal(model.decode(nxt, state), model.decode(nxt, loaded))


def test_state_for_another_model_is_refused(tmp_path):
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    state = model.new_state(1)
    model.save_state(state, tmp_path / "s.safetensors")
    with pytest.raises(models.StateError, match="saved for model"):
        other.load_state(tmp_path / "s.safetensors")


def test_corrupt_or_missing_state_file_is_a_clear_error(tmp_path):
    model = tiny_model()
    with pytest.raises(models.StateError, match="not found"):
        model.load_state(tmp_path / "nope.safetensors")
    model.save_state(model.new_state(1), tmp_path / "s.safetensors")
    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(models.StateError, match="not a readable state file"):
        model.load_state(tmp_path / "t.safetensors")


def test_state_size_grows_by_one_checkpoint_per_segment():
    model = tiny_model(aggregation="grm")
    state = model.new_state(1)
    empty = state.nbytes()
    with torch.no_grad():
        model.prefill(tokens(1, 10), state)
    c = model.config
    conv_tail = (c.conv_size - 1) * c.n_heads * (2 * c.dk + c.dv)
    per_ckpt = c.n_layers * (c.n_heads * (c.dk * c.dv + c.dk) + conv_tail) * 4
    assert state.nbytes() - empty == 2 * per_ckpt


@pytest.mark.parametrize("boundary", ["carry", "reset"])
@pytest.mark.parametrize("memory,aggregation", [("gla", "grm"), ("delta", "residual"), ("linear", "ssc")])
@torch.no_grad()
def test_rewind_to_a_checkpoint_then_continue_equals_uninterrupted(memory, aggregation, boundary):
    model = tiny_model(memory=memory, aggregation=aggregation, boundary=boundary)
    toks = tokens(2, 28)
    uninterrupted = model(toks)
    state = model.new_state(2)
    model.prefill(toks[:, :23], state)  # 4 checkpoints
    for n in (0, 2, 4):
        rewound = model.rewind(state, n)
        start = n * model.config.segment_size
        assert rewound.num_tokens == start and rewound.num_checkpoints == n
        logits = model.prefill(toks[:, start:], rewound)
        assert max_err(logits, uninterrupted[:, start:]) < 1e-4
    with pytest.raises(ValueError, match="cannot rewind"):
        model.rewind(state, 5)
