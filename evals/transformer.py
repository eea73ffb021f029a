"""The upper reference for recall: a small softmax-attention transformer of the same width and
building blocks as the MC models (RMSNorm, SwiGLU, pre-norm residuals), with rotary positions and
causal `scaled_dot_product_attention`. Its state grows with the sequence (a KV cache), which is
exactly what MC's fixed-size memory plus checkpoints is measured against.

Like the MC mixer, it runs q, k, v through a short causal convolution (`conv_size`, 0 = off).
Without it, attention has to learn a previous-token head before it can do associative recall,
and in the grid's 1500 steps it did not (MQAR accuracy 0.12 / 0.07 / 0.05 at lr 3e-3 and
0.12 / 0.08 / 0.07 at 1e-3, measured 2026-11-23), while the MC models get that shift for free."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import RMSNorm, ShortConv, SwiGLU


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_hidden: int = 256
    conv_size: int = 4
    norm_eps: float = 1e-6
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model {self.d_model} must split into {self.n_heads} heads of even size")
        if self.conv_size < 0 or self.conv_size == 1:
            raise ValueError(f"conv_size must be 0 (off) or >= 2, got {self.conv_size}")


def rotary(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate channel pairs of x [B,H,T,D] by position-dependent angles (RoPE)."""
    T, D = x.shape[-2], x.shape[-1]
    freqs = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angles = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * freqs[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.n_heads, self.base = c.n_heads, c.rope_base
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
        self.conv = ShortConv(3 * c.d_model, c.conv_size) if c.conv_size else None
        self.out = nn.Linear(c.d_model, c.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x)
        if self.conv is not None:  # whole sequences only (no decode cache): the tail starts at zero
            qkv, _ = self.conv(qkv, self.conv.new_tail(B, x.device))
        q, k, v = (t.view(B, T, self.n_heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(rotary(q, self.base), rotary(k, self.base), v, is_causal=True)
        return self.out(y.transpose(1, 2).flatten(2))


class TransformerBlock(nn.Module):
    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(c.d_model, c.norm_eps), Attention(c)
        self.mlp_norm, self.mlp = RMSNorm(c.d_model, c.norm_eps), SwiGLU(c.d_model, c.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        out_std = 0.02 / math.sqrt(2 * config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 2 and not name.endswith("conv.weight"):  # the conv keeps its identity start
                nn.init.normal_(p, 0.0, out_std if name.endswith(("out.weight", "down.weight")) else 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B,T] -> logits [B,T,V] (tied embeddings, like the MC models' default)."""
        return self.logits(self.features(tokens))

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B,T] -> the final normed hidden states [B,T,d]."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.embed.weight.T

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_bytes_per_token(self) -> int:
        """fp32 KV cache per token of context: keys and values of every layer."""
        return 2 * self.config.n_layers * self.config.d_model * 4

    def fixed_state_bytes(self) -> int:
        """fp32 conv tail of every layer (the last conv_size - 1 inputs), independent of length."""
        c = self.config
        return c.n_layers * max(c.conv_size - 1, 0) * 3 * c.d_model * 4
