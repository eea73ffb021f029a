"""Triton decode-step kernel against its torch reference: odd sizes, padded slots, every memory.
Runs in the Triton interpreter on the CPU (conftest sets TRITON_INTERPRET) and for real on CUDA."""

import pytest
import torch

from mckernels.decode_step import decode_step_ref
from mckernels.decode_step.triton_kernel import decode_step_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(B, H, dk, dv, slots, memory, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)
    state = rnd(slots, H, dk, dv)
    q = torch.nn.functional.normalize(rnd(B, H, dk), dim=-1)
    k = torch.nn.functional.normalize(rnd(B, H, dk), dim=-1)
    v = rnd(B, H, dv)
    log_a = torch.zeros(B, H) if memory == "linear" else -torch.rand(B, H, generator=g) * 0.2
    beta = torch.rand(B, H, generator=g) if memory == "delta" else None
    to = lambda t: None if t is None else t.to(DEVICE)
    return [to(t) for t in (state, q, k, v, log_a, beta)]


@pytest.mark.parametrize("memory", ["linear", "gla", "delta"])
@pytest.mark.parametrize("dk,dv", [(6, 10), (16, 16), (12, 70)])
def test_decode_step_kernel_matches_reference(memory, dk, dv):
    B, H, S = 4, 3, 6
    state, q, k, v, log_a, beta = inputs(B, H, dk, dv, S, memory)
    slot_ids = torch.tensor([4, -1, 0, 2], device=DEVICE)  # one padded row
    ref_state = state.clone()
    ref_out = decode_step_ref(ref_state, slot_ids, q, k, v, log_a, beta)
    out = decode_step_triton(state, slot_ids, q, k, v, log_a, beta)
    assert torch.allclose(out, ref_out, atol=1e-5), (out - ref_out).abs().max()
    assert torch.allclose(state, ref_state, atol=1e-5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))          # the padded row did nothing
    untouched = [1, 3, 5]
    original = inputs(B, H, dk, dv, S, memory)[0]
    assert torch.equal(state[untouched], original[untouched])     # other slots are left alone


def test_reference_matches_the_model_memories():
    """The reference is the model's own update/read (so the kernel is tied to the model)."""
    from models.config import ModelConfig
    from models.memory import build_memory
    for memory in ("gla", "delta"):
        mem = build_memory(ModelConfig(memory=memory, d_model=8, n_heads=3))
        state, q, k, v, log_a, beta = [t.cpu() if t is not None else None for t in inputs(2, 3, 6, 10, 2, memory)]
        expected_M = mem.update(state.clone(), k, v, log_a, beta)
        expected = mem.read(expected_M, q)
        got_state = state.clone()
        got = decode_step_ref(got_state, torch.tensor([0, 1]), q, k, v, log_a, beta)
        assert torch.allclose(got, expected, atol=1e-6) and torch.allclose(got_state, expected_M, atol=1e-6)


@pytest.mark.parametrize("memory", ["linear", "gla", "delta"])
def test_decode_step_kernel_matches_flash_linear_attention(memory):
    """fla's fused_recurrent (simple_gla / gated delta rule) computes the same step: an oracle
    written by others, and the baseline `benchmarks.kernel_bench` times ours against."""
    pytest.importorskip("fla", reason="fla-core is not installed")
    from mckernels.fla_baseline import fla_decode_step, load
    fla = load()
    B, H, dk, dv = 3, 2, 12, 70
    state, q, k, v, log_a, beta = inputs(B, H, dk, dv, B, memory, seed=3)
    want, want_state = fla_decode_step(fla, state, q, k, v, log_a, beta)
    got = decode_step_triton(state, torch.arange(B, device=DEVICE), q, k, v, log_a, beta)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(state, want_state, atol=1e-5)
