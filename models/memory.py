"""Memory types: how the online state `M` (per head a `dk x dv` matrix) is written and read.

A memory is a small interface, so that the mixer never branches on the memory kind:

- `gates(x)`: the per-token decay `log a_t` and write strength `b_t` it needs (or None);
- `update(M, k, v, log_a, beta)`: one token's write (the naive and decode paths);
- `read(M, q)`: `M^T q`;
- `mix(states, weights)`: the parameter "soup" `sum_j w_j M_j`;
- `chunk_terms(...)` / `chunk_advance(...)`: the chunked form used by the parallel path. The
  within-chunk work is done for all chunks at once; `chunk_advance` then carries the state
  from one chunk to the next (the only sequential part).

Shapes: heads first. One token: M [B,H,dk,dv], q/k [B,H,dk], v [B,H,dv], log_a/beta [B,H].
Chunked: [B,H,N,L,*] for N chunks of L tokens.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class Memory(nn.Module, metaclass=abc.ABCMeta):
    """Matrix-valued associative memory, `o = M^T q`."""

    fusable_scan = False  # whether chunk_prefill's kernel runs its chunks from q, k, v, log_a directly

    @abc.abstractmethod
    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B,T,d] -> (log_a [B,H,T], beta [B,H,T] or None)."""

    @abc.abstractmethod
    def update(self, M, k, v, log_a, beta) -> torch.Tensor:
        """One token's write: the new M."""

    @abc.abstractmethod
    def chunk_terms(self, q, k, v, log_a, beta) -> "ChunkTerms":
        """The state-independent part of every chunk, computed for all chunks at once."""

    @abc.abstractmethod
    def chunk_advance(self, chunk: "ChunkTerms", M0: torch.Tensor):
        """One chunk's terms (`ChunkTerms.unbind`) and the state M0 entering it -> (online
        read-out [B,H,L,dv], state leaving it)."""

    @staticmethod
    def read(M: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (q[..., None, :] @ M)[..., 0, :]

    @staticmethod
    def mix(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """states [B,H,n,dk,dv], weights [B,H,n] -> [B,H,dk,dv]."""
        mixed = weights[..., None, :] @ states.flatten(3)  # [B,H,1,dk*dv], no copy of the states
        return mixed.view(*states.shape[:2], *states.shape[3:])


@dataclass
class ChunkTerms:
    """Everything about a chunk that does not depend on the state entering it."""
    q_decayed: torch.Tensor       # q_t * gamma_t, [B,H,N,L,dk]
    attn: torch.Tensor            # causal within-chunk scores incl. decay, [B,H,N,L,L]
    values: torch.Tensor          # v (gla) or U' (delta), [B,H,N,L,dv]
    k_to_end: torch.Tensor        # k_s * gamma_L / gamma_s, [B,H,N,L,dk]
    gamma_end: torch.Tensor       # total decay of the chunk, [B,H,N]
    w: torch.Tensor | None = None  # delta only: U = U' - W M0, [B,H,N,L,dk]

    def unbind(self) -> list["ChunkTerms"]:
        """The terms of each chunk (the N axis dropped). One unbind instead of indexing chunk n
        in the loop: the backward of `x[:, :, n]` writes a full-size zero tensor per chunk."""
        fields = [None if t is None else t.unbind(2)
                  for t in (getattr(self, f.name) for f in dataclasses.fields(self))]
        return [ChunkTerms(*(None if f is None else f[n] for f in fields)) for n in range(self.attn.shape[2])]


def _decay_matrix(G: torch.Tensor) -> torch.Tensor:
    """exp(G_t - G_s) for s <= t, else 0. G [...,L] -> [...,L,L]."""
    L = G.shape[-1]
    mask = torch.ones(L, L, dtype=torch.bool, device=G.device).tril()
    diff = G[..., :, None] - G[..., None, :]
    return torch.exp(diff.masked_fill_(~mask, float("-inf")))  # in place: diff is ours


class GatedLinearMemory(Memory):
    """`M_t = a_t M_{t-1} + k_t v_t^T`; with `a_t = 1` this is plain linear attention."""

    fusable_scan = True  # mckernels/chunk_prefill implements its chunk loop

    def __init__(self, config: ModelConfig, decay: bool):
        super().__init__()
        self.n_heads = config.n_heads
        self.decay = nn.Linear(config.d_model, config.n_heads) if decay else None
        if decay:
            _init_decay(self.decay)

    def gates(self, x):
        return _log_decay(self.decay, x, self.n_heads), None

    def update(self, M, k, v, log_a, beta):
        a = torch.exp(log_a)[..., None, None]
        return a * M + k[..., :, None] * v[..., None, :]

    def chunk_terms(self, q, k, v, log_a, beta):
        G = log_a.cumsum(-1)
        attn = (q @ k.transpose(-1, -2)) * _decay_matrix(G)
        return ChunkTerms(
            q_decayed=q * torch.exp(G)[..., None],
            attn=attn,
            values=v,
            k_to_end=k * torch.exp(G[..., -1:] - G)[..., None],
            gamma_end=torch.exp(G[..., -1]),
        )

    def chunk_advance(self, chunk, M0):
        v = chunk.values
        out = chunk.attn @ v + chunk.q_decayed @ M0
        M1 = chunk.gamma_end[..., None, None] * M0 + chunk.k_to_end.transpose(-1, -2) @ v
        return out, M1


class DeltaMemory(Memory):
    """Gated delta rule: `M_t = a_t (M_{t-1} - b_t k_t (k_t^T M_{t-1})) + b_t k_t v_t^T`.

    Chunked with the WY/UT form: writing `u_t = b_t (v_t - a_t M_{t-1}^T k_t)` turns the update
    into `M_t = a_t M_{t-1} + k_t u_t^T`, and within a chunk `(I + A) U = diag(b)(V - Gamma K M0)`
    with `A_ts = b_t (gamma_t/gamma_s) k_t.k_s` (s < t). So `U = U' - W M0` with
    `U' = T diag(b) V`, `W = T diag(b) Gamma K`, `T = (I + A)^-1` (a unit-triangular solve).
    """

    def __init__(self, config: ModelConfig, own_gates: bool = True):
        super().__init__()
        self.n_heads = config.n_heads
        self.decay = nn.Linear(config.d_model, config.n_heads) if config.delta_decay and own_gates else None
        if self.decay is not None:
            _init_decay(self.decay)
        self.write = nn.Linear(config.d_model, config.n_heads, bias=False) if own_gates else None

    def gates(self, x):
        beta = torch.sigmoid(self.write(x)).permute(0, 2, 1)
        return _log_decay(self.decay, x, self.n_heads), beta

    def update(self, M, k, v, log_a, beta):
        a = torch.exp(log_a)[..., None, None]
        b = beta[..., None, None]
        recalled = self.read(M, k)
        return a * (M - b * k[..., :, None] * recalled[..., None, :]) + b * k[..., :, None] * v[..., None, :]

    def chunk_terms(self, q, k, v, log_a, beta):
        G = log_a.cumsum(-1)
        gamma = torch.exp(G)
        decay = _decay_matrix(G)
        # The solve reads only the strict lower triangle of I + A (unitriangular: the diagonal
        # is taken as 1, the upper part ignored, in the forward and the gradient alike), so
        # A's diagonal and the identity need not be formed.
        A = ((beta[..., None] * k) @ k.transpose(-1, -2)) * decay
        rhs = torch.cat([beta[..., None] * v, (beta * gamma)[..., None] * k], dim=-1)
        solved = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
        dv = v.shape[-1]
        return ChunkTerms(
            q_decayed=q * gamma[..., None],
            attn=(q @ k.transpose(-1, -2)) * decay,
            values=solved[..., :dv],
            k_to_end=k * torch.exp(G[..., -1:] - G)[..., None],
            gamma_end=torch.exp(G[..., -1]),
            w=solved[..., dv:],
        )

    def chunk_advance(self, chunk, M0):
        u = chunk.values - chunk.w @ M0
        out = chunk.attn @ u + chunk.q_decayed @ M0
        M1 = chunk.gamma_end[..., None, None] * M0 + chunk.k_to_end.transpose(-1, -2) @ u
        return out, M1


def build_memory(config: ModelConfig, own_gates: bool = True) -> Memory:
    """The memory of `config`; with `own_gates` False the parametrisation computes the decay
    (Mamba2's dt A) and the memory holds no parameters of its own."""
    if config.memory == "linear" or (config.memory == "gla" and not own_gates):
        return GatedLinearMemory(config, decay=False)
    if config.memory == "gla":
        return GatedLinearMemory(config, decay=True)
    return DeltaMemory(config, own_gates)


def _log_decay(proj: nn.Linear | None, x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """log a_t = -softplus(w_a . x_t + b_a), [B,H,T]; zeros when the memory has no decay."""
    if proj is None:
        return x.new_zeros(x.shape[0], n_heads, x.shape[1])
    return -F.softplus(proj(x).float()).permute(0, 2, 1)


def _init_decay(proj: nn.Linear, lo: float = 1e-3, hi: float = 1e-1) -> None:
    """Per-head decay rates -log a spread log-uniformly in [lo, hi] (half-lives ~7..700 tokens)."""
    with torch.no_grad():
        proj.weight.normal_(0.0, 0.01)
        heads = proj.bias.shape[0]
        rate = torch.exp(torch.linspace(torch.log(torch.tensor(lo)), torch.log(torch.tensor(hi)), heads))
        proj.bias.copy_(torch.log(torch.expm1(rate)))  # inverse softplus
