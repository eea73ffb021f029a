"""Mamba2 (transformers' `Mamba2ForCausalLM`) as a parametrisation of the MC mixer.

Mamba2's SSD layer is a gla memory: per head, `h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T` and
`y_t = h_t C_t + D x_t`. In the memory's terms (M [dk, dv] = h^T, read `M^T q`): k = B_t, q = C_t
(each shared by the heads of a group), v = dt_t x_t, log a_t = dt_t A, with dk = state_size and
dv = head_dim. Everything around it follows transformers' `Mamba2Mixer`: one in_proj split into
z, xBC and dt; a depthwise causal convolution (with bias) and SiLU over xBC; dt = softplus(dt +
dt_bias) clamped to its limits; A = -exp(A_log); the D skip; a gated RMSNorm (y * silu(z),
normalised per group); out_proj. Memory Caching adds only the connector u (`u_proj`) when the
aggregation scores segments.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import ShortConv
from .mixer import Mixer, Projected


class GatedGroupRMSNorm(nn.Module):
    """RMSNorm of `y * silu(z)` over groups of `group_size` channels (transformers' MambaRMSNormGated)."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = (y.float() * F.silu(z.float())).unflatten(-1, (-1, self.group_size))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.flatten(-2)


class Mamba2Mixer(Mixer):
    memory_owns_gates = False  # log a = dt A comes from in_proj's dt

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        c = config
        H, N, P, G = c.n_heads, c.dk, c.dv, c.n_groups
        self.d_inner = H * P
        self.conv_splits = [self.d_inner, G * N, G * N]               # x, B, C
        self.proj_splits = [self.d_inner, sum(self.conv_splits), H]  # z, xBC, dt
        self.in_proj = nn.Linear(c.d_model, sum(self.proj_splits), bias=c.proj_bias)
        self.conv = ShortConv(sum(self.conv_splits), c.conv_size, bias=c.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.ones(H))
        self.out_norm = GatedGroupRMSNorm(self.d_inner, self.d_inner // G, c.norm_eps)
        self.o_proj = nn.Linear(self.d_inner, c.d_model, bias=c.proj_bias)
        self.u_proj = nn.Linear(c.d_model, H * N, bias=False) if c.scores_segments else None
        self._init_ssm()

    @torch.no_grad()
    def _init_ssm(self, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
        """As transformers initialises a new Mamba2: A = 1..H, dt log-uniform in [dt_min, dt_max]."""
        H = self.config.n_heads
        self.A_log.copy_(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        dt = torch.exp(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        nn.init.normal_(self.conv.weight, 0.0, 0.3)

    def project(self, x: torch.Tensor, conv_tail: torch.Tensor | None) -> Projected:
        c = self.config
        H, N, P, G = c.n_heads, c.dk, c.dv, c.n_groups
        z, xBC, dt = self.in_proj(x).split(self.proj_splits, dim=-1)
        conv_window = self.conv.window(xBC, conv_tail)
        xBC, conv_tail = self.conv.convolve(conv_window)
        xs, B, C = xBC.float().split(self.conv_splits, dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if c.dt_min > 0 or c.dt_max > 0:
            dt = dt.clamp(min=c.dt_min, max=c.dt_max or None)
        dt = dt.transpose(1, 2)                                            # [B,H,T]
        xs = xs.unflatten(-1, (H, P)).transpose(1, 2)                      # [B,H,T,P]
        grouped = lambda t: t.unflatten(-1, (G, N)).repeat_interleave(H // G, dim=2).transpose(1, 2)
        u = self.u_proj(x).float().unflatten(-1, (H, N)).transpose(1, 2) if self.u_proj is not None else None
        return Projected(
            q=grouped(C), k=grouped(B), v=xs * dt[..., None], u=u,
            log_a=dt * -torch.exp(self.A_log.float())[:, None], beta=None, gate=z,
            conv_tail=conv_tail, conv_window=conv_window, skip=xs * self.D.float()[:, None, None])

    def finish(self, y: torch.Tensor, p: Projected, x: torch.Tensor) -> torch.Tensor:
        y = (y + p.skip).transpose(1, 2).flatten(2)
        return self.o_proj(self.out_norm(y, p.gate).to(x.dtype))
