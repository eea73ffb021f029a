"""Gated DeltaNet (flash-linear-attention's `GatedDeltaNet` layer) as a parametrisation of the
MC mixer, over the `delta` memory.

fla's layer: q, k, v projections, each through its own depthwise causal convolution and SiLU
(one convolution over their concatenation here: depthwise, so the same); q and k L2-normalised
per head and q scaled by 1/sqrt(dk); beta = sigmoid(b_proj x) (times 2 with negative
eigenvalues allowed); the decay log a = -exp(A_log) softplus(a_proj x + dt_bias); the gated
delta rule; a per-head RMSNorm times act(g_proj x) (swish or sigmoid); o_proj. With fewer q/k
heads than value heads (GVA, `n_groups` < `n_heads`) each q/k head serves a group of value
heads. The projections are one matrix here (q, k, v, g, a, b; one matmul), cut apart from
fla's on load (models/hf_import.py). Memory Caching adds only the connector u (`u_proj`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import ShortConv
from .mixer import Mixer, Projected

L2_EPS = 1e-6  # fla's l2norm: x / sqrt(sum x^2 + eps)


class GatedDeltaNetMixer(Mixer):
    memory_owns_gates = False  # beta and the decay come from in_proj

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        c = config
        H, G, dk, dv = c.n_heads, c.n_groups, c.dk, c.dv
        self.conv_splits = [G * dk, G * dk, H * dv]                  # q, k, v
        self.proj_splits = [*self.conv_splits, H * dv, H, H]         # then g, a, b
        self.in_proj = nn.Linear(c.d_model, sum(self.proj_splits), bias=False)
        self.conv = ShortConv(sum(self.conv_splits), c.conv_size, bias=c.conv_bias)
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.head_norm_weight = nn.Parameter(torch.ones(dv))
        self.o_proj = nn.Linear(H * dv, c.d_model, bias=False)
        self.u_proj = nn.Linear(c.d_model, H * dk, bias=False) if c.scores_segments else None

    def project(self, x: torch.Tensor, conv_tail: torch.Tensor | None) -> Projected:
        c = self.config
        H, G, dk, dv = c.n_heads, c.n_groups, c.dk, c.dv
        qkv, gate, a, b = self.in_proj(x).split([sum(self.conv_splits), H * dv, H, H], dim=-1)
        conv_window = self.conv.window(qkv, conv_tail)
        qkv, conv_tail = self.conv.convolve(conv_window)
        q, k, v = qkv.float().split(self.conv_splits, dim=-1)

        def grouped(t: torch.Tensor) -> torch.Tensor:  # [B,T,G*dk] -> normalised [B,H,T,dk]
            t = t.unflatten(-1, (G, dk))
            t = t * torch.rsqrt(t.pow(2).sum(-1, keepdim=True) + L2_EPS)
            return t.repeat_interleave(H // G, dim=2).transpose(1, 2)
        beta = torch.sigmoid(b.float()) * (2.0 if c.neg_eigval else 1.0)
        log_a = -torch.exp(self.A_log.float()) * F.softplus(a.float() + self.dt_bias.float())
        u = self.u_proj(x).float().unflatten(-1, (H, dk)).transpose(1, 2) if self.u_proj is not None else None
        return Projected(
            q=grouped(q) * dk ** -0.5, k=grouped(k), v=v.unflatten(-1, (H, dv)).transpose(1, 2), u=u,
            log_a=log_a.transpose(1, 2), beta=beta.transpose(1, 2), gate=gate,
            conv_tail=conv_tail, conv_window=conv_window)

    def finish(self, y: torch.Tensor, p: Projected, x: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm, times act(g), o_proj."""
        c = self.config
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + c.norm_eps) * self.head_norm_weight.float()
        y = y.transpose(1, 2).flatten(2)
        g = p.gate.float()
        gated = y * (torch.sigmoid(g) if c.gate_activation == "sigmoid" else F.silu(g))
        return self.o_proj(gated.to(x.dtype))
