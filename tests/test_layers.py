"""The short causal convolution's hand-written backward against conv1d's autograd."""

import torch
import torch.nn.functional as F

from models.layers import CausalDepthwiseConv, ShortConv


def _conv1d_reference(full: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.conv1d(full.transpose(1, 2), weight[:, None, :], groups=weight.shape[0]).transpose(1, 2)


def test_causal_depthwise_conv_matches_conv1d_with_gradients():
    torch.manual_seed(0)
    full = torch.randn(3, 11 + 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 11, 5, dtype=torch.float64)
    ours = CausalDepthwiseConv.apply(full, weight)
    ours_grads = torch.autograd.grad(ours, (full, weight), grad)
    ref = _conv1d_reference(full, weight)
    ref_grads = torch.autograd.grad(ref, (full, weight), grad)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(CausalDepthwiseConv.apply, (full[:1, :6, :2].detach().requires_grad_(),
                                                                 weight[:2].detach().requires_grad_()))


def test_short_conv_carries_its_tail_across_calls():
    torch.manual_seed(0)
    conv = ShortConv(6, 4)
    x = torch.randn(2, 9, 6)
    whole, _ = conv(x, conv.new_tail(2))
    first, tail = conv(x[:, :5], conv.new_tail(2))
    parts = [first]
    for t in range(5, 9):  # then token by token, the decode path
        out, tail = conv(x[:, t:t + 1], tail)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), whole)


def test_short_conv_in_bf16_sums_in_fp32():
    torch.manual_seed(0)
    conv = ShortConv(8, 4).to(torch.bfloat16)
    x = torch.randn(2, 16, 8).to(torch.bfloat16)
    out, _ = conv(x, conv.new_tail(2))
    full = torch.cat([conv.new_tail(2), x.float()], 1)
    expected = F.silu(_conv1d_reference(full, conv.weight.float())).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)


def test_short_conv_decode_and_prefill_agree_in_bf16():
    """Both paths sum in fp32 and round once. (When decode summed bf16 products, 18% of these
    outputs differed from the prefill path's by a bf16 step.)"""
    torch.manual_seed(0)
    conv = ShortConv(64, 4).to(torch.bfloat16)
    x = torch.randn(4, 64, 64).to(torch.bfloat16)
    whole, _ = conv(x, conv.new_tail(4))
    tail, parts = conv.new_tail(4), []
    for t in range(x.shape[1]):
        out, tail = conv(x[:, t:t + 1], tail)
        parts.append(out)
    differing = (torch.cat(parts, 1) != whole).float().mean().item()
    assert differing < 0.01, differing
