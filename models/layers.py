"""Small building blocks shared by the model: RMSNorm, SwiGLU, the short causal convolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class ShortConv(nn.Module):
    """Depthwise causal convolution of width `width` over time, followed by SiLU.

    Causality across calls is kept by the *tail*: the last `width - 1` inputs seen so far,
    which the caller stores in the recurrent state (zeros at the start of a sequence).
    """

    def __init__(self, channels: int, width: int, bias: bool = False):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, width))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        # Start close to the identity (the newest input), so early training sees clean q, k, v.
        with torch.no_grad():
            self.weight.normal_(0.0, 0.02)
            self.weight[:, -1] += 1.0

    def new_tail(self, batch: int, device=None) -> torch.Tensor:
        return torch.zeros(batch, self.width - 1, self.weight.shape[0], device=device)

    def forward(self, x: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C], tail [B, width-1, C] -> (SiLU(conv(x)) [B, T, C], new tail)."""
        return self.convolve(self.window(x, tail))

    def window(self, x: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        """The conv's input: the old tail followed by x, [B, width-1+T, C]."""
        return torch.cat([tail.to(x.dtype), x], dim=1)

    def convolve(self, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A window (`window`) -> (SiLU(conv) over its last T positions, the new tail)."""
        # Summed in fp32 whatever the weights' dtype (like conv1d's accumulator), and rounded once,
        # so bf16 decode and prefill agree.
        weight = self.weight.to(full.dtype).float()
        if full.shape[1] == self.width:  # decode: one product and sum (a third of the FMAs' time at batch 1)
            out = (full.float() * weight.t()).sum(1, keepdim=True).to(full.dtype)
        else:
            out = CausalDepthwiseConv.apply(full.float(), weight).to(full.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return F.silu(out), full[:, full.shape[1] - (self.width - 1):]


class CausalDepthwiseConv(torch.autograd.Function):
    """out[t] = sum_j full[t + j] * weight[:, j] in the [B, T, C] layout, as `width` fused
    multiply-adds. conv1d wants [B, C, T]: the two transposed copies, its backward and a SiLU on
    the strided result took ~2x as long on the CPU, where the grid trains."""

    @staticmethod
    def forward(ctx, full: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        width = weight.shape[1]
        T = full.shape[1] - width + 1
        out = full[:, width - 1:] * weight[:, width - 1]
        for j in range(width - 1):
            out.addcmul_(full[:, j:j + T], weight[:, j])
        ctx.save_for_backward(full, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full, weight = ctx.saved_tensors
        width, T = weight.shape[1], grad.shape[1]
        grad = grad.contiguous()
        grad_full = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_full = torch.zeros_like(full)
            for j in range(width):
                grad_full[:, j:j + T].addcmul_(grad, weight[:, j])
        if ctx.needs_input_grad[1]:
            grad_weight = torch.stack([(grad * full[:, j:j + T]).sum((0, 1)) for j in range(width)], dim=1)
        return grad_full, grad_weight
