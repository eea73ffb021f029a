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

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, width))
        # Start close to the identity (the newest input), so early training sees clean q, k, v.
        with torch.no_grad():
            self.weight.normal_(0.0, 0.02)
            self.weight[:, -1] += 1.0

    def new_tail(self, batch: int, device=None) -> torch.Tensor:
        return torch.zeros(batch, self.width - 1, self.weight.shape[0], device=device)

    def forward(self, x: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C], tail [B, width-1, C] -> (SiLU(conv(x)) [B, T, C], new tail)."""
        full = torch.cat([tail.to(x.dtype), x], dim=1)
        weight = self.weight.to(x.dtype)
        if x.shape[1] == 1:  # decode: a dot product over the window beats conv1d's set-up cost
            out = (full * weight.t()).sum(1, keepdim=True)
        else:
            out = F.conv1d(full.transpose(1, 2), weight[:, None, :], groups=weight.shape[0]).transpose(1, 2)
        new_tail = full[:, full.shape[1] - (self.width - 1):]
        return F.silu(out), new_tail
