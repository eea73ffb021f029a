"""The Memory Caching mixer: one MC memory layer with its three execution paths.

`Mixer` holds the paths, written once over a memory (models/memory.py) and a parametrisation:
`project` (token features -> q, k, v, decay, gates, conv) and `finish` (read-outs -> the
layer's output). `MCMixer` is mcserve's own parametrisation; models/mamba2.py is transformers'
Mamba2. The engine reaches every one through the same two methods.

- `naive`: a token loop written straight from the equations (docs/design.md section 1), the reference;
- `chunked`: the parallel form over a whole chunk of tokens, starting from any state (training,
  prefill); chunks never straddle a segment boundary, so checkpoints fall out at chunk ends;
- `step`: one token for a batch of states (decode), vectorised over the cached checkpoints;
  `decode_step` is its read-out alone, for callers (the engine) that keep their own checkpoints.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mckernels.aggregation import gate_weights

from .checkpoints import DenseCheckpoints
from .chunk_layout import ChunkLayout
from .config import ModelConfig
from .layers import RMSNorm, ShortConv
from .memory import build_memory
from .state import LayerState

MAX_CHUNK = 64


def pick_chunk_size(segment_size: int, target: int = MAX_CHUNK) -> int:
    """The largest chunk <= target that divides the segment, so chunks tile segments exactly."""
    if segment_size <= target:
        return segment_size
    best = max(d for d in range(1, target + 1) if segment_size % d == 0)
    return best if best >= 16 else segment_size


@dataclass
class Projected:
    """One layer's per-token inputs for a span of T tokens (heads first)."""
    q: torch.Tensor                  # [B,H,T,dk], L2-normalised
    k: torch.Tensor                  # [B,H,T,dk], L2-normalised
    v: torch.Tensor                  # [B,H,T,dv]
    u: torch.Tensor | None           # [B,H,T,dk], the connector that scores segments
    log_a: torch.Tensor              # [B,H,T], log decay (0 without decay)
    beta: torch.Tensor | None        # [B,H,T], delta write strength
    gate: torch.Tensor               # [B,T,*], output gate (pre-activation)
    conv_tail: torch.Tensor | None   # [B,W-1,C], conv inputs after the span
    conv_window: torch.Tensor | None  # [B,W-1+T,C], old tail + the span's conv inputs
    skip: torch.Tensor | None = None  # [B,H,T,dv], added to the read-out (Mamba2's D x)

    def conv_tail_at(self, offset: int | list) -> torch.Tensor | None:
        """The conv tail after the first `offset` tokens of the span (for a checkpoint there):
        [B,W-1,C]; or after row b's own offsets, `offset` [B] or [B,K] -> [B,(K,)W-1,C]."""
        if self.conv_window is None:
            return None
        width = self.conv_window.shape[1] - self.q.shape[2]
        if isinstance(offset, int):
            return self.conv_window[:, offset:offset + width]
        device = self.conv_window.device
        index = torch.as_tensor(offset, device=device)[..., None] + torch.arange(width, device=device)
        rows = torch.arange(index.shape[0], device=device).view(-1, *[1] * (index.dim() - 1))
        return self.conv_window[rows, index]


class Mixer(nn.Module, metaclass=abc.ABCMeta):
    """The paths; a subclass gives `project`, `finish` and its `conv` (a ShortConv or None)."""

    conv: ShortConv | None
    memory_owns_gates = True  # False: `project` computes log_a and beta itself

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.memory = build_memory(config, self.memory_owns_gates)
        self.chunk_size = pick_chunk_size(config.segment_size)

    @abc.abstractmethod
    def project(self, x: torch.Tensor, conv_tail: torch.Tensor | None) -> Projected:
        """Token features x [B,T,d] -> the memory's inputs for the span (and the new conv tail)."""

    @abc.abstractmethod
    def finish(self, y: torch.Tensor, p: Projected, x: torch.Tensor) -> torch.Tensor:
        """y [B,H,T,dv], the read-outs of the span `p` -> the layer's output [B,T,d]."""

    def mc_parameters(self) -> dict[str, slice | None]:
        """What Memory Caching adds to the layer: parameter name -> the rows that are MC's
        (None: all of it). The connector u, which scores segments (and routes for ssc)."""
        return {"u_proj.weight": None} if getattr(self, "u_proj", None) is not None else {}

    # --- shared pieces ---------------------------------------------------------------------
    def new_state(self, batch: int, device=None) -> LayerState:
        c = self.config
        H, dk, dv = c.n_heads, c.dk, c.dv
        zeros = lambda *shape: torch.zeros(*shape, device=device)
        return LayerState(
            online=zeros(batch, H, dk, dv), key_sum=zeros(batch, H, dk),
            ckpts=zeros(batch, H, 0, dk, dv), summaries=zeros(batch, H, 0, dk),
            conv_tail=self.conv.new_tail(batch, device) if self.conv else None,
            ckpt_conv=zeros(batch, 0, *self.conv.new_tail(1).shape[1:]) if self.conv else None)

    def _score(self, u: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        return (u * summaries).sum(-1) * self.config.score_scale

    # --- path 1: naive token loop (the reference) ------------------------------------------
    def naive(self, x: torch.Tensor) -> torch.Tensor:
        c, mem = self.config, self.memory
        B, T, _ = x.shape
        st = self.new_state(B, x.device)
        p = self.project(x, st.conv_tail)
        q, k, v, u, log_a, beta = p.q, p.k, p.v, p.u, p.log_a, p.beta
        M, key_sum, count = st.online, st.key_sum, 0
        ckpts: list[torch.Tensor] = []
        summaries: list[torch.Tensor] = []
        outs = []
        for t in range(T):
            b_t = beta[:, :, t] if beta is not None else None
            M = mem.update(M, k[:, :, t], v[:, :, t], log_a[:, :, t], b_t)
            key_sum, count = key_sum + k[:, :, t], count + 1
            q_t = q[:, :, t]
            if c.aggregation == "none":
                y = mem.read(M, q_t)
            elif c.aggregation == "residual":
                y = mem.read(M, q_t) + sum((mem.read(C, q_t) for C in ckpts), torch.zeros_like(v[:, :, t]))
            else:
                y = self._naive_gated_read(M, ckpts, summaries, q_t, u[:, :, t], key_sum / count)
            outs.append(y)
            if (t + 1) % c.segment_size == 0:
                checkpoint, summary, M, key_sum = self.close_segment(M, key_sum)
                count = 0
                ckpts.append(checkpoint)  # kept by every aggregation: `none` never reads them
                summaries.append(summary)
        return self.finish(torch.stack(outs, dim=2), p, x)

    def _naive_gated_read(self, M, ckpts, summaries, q_t, u_t, online_summary):
        c, mem = self.config, self.memory
        online_r = self._score(u_t, online_summary)
        if not ckpts:
            return mem.read(M, q_t)
        r = torch.stack([self._score(u_t, s) for s in summaries], dim=-1)  # [B,H,n]
        keep = torch.ones_like(r, dtype=torch.bool)
        if c.aggregation == "ssc" and r.shape[-1] > c.ssc_top_k:
            rank = r.argsort(dim=-1, descending=True).argsort(dim=-1)
            keep = rank < c.ssc_top_k
        top = torch.maximum(r.masked_fill(~keep, float("-inf")).amax(-1), online_r)
        w = torch.exp(r - top[..., None]) * keep
        w_online = torch.exp(online_r - top)
        total = w.sum(-1) + w_online
        weights = [w[..., i] / total for i in range(len(ckpts))] + [w_online / total]
        states = ckpts + [M]
        if c.aggregation == "soup":
            return mem.read(mem.mix(torch.stack(states, 2), torch.stack(weights, -1)), q_t)
        return sum(g[..., None] * mem.read(S, q_t) for g, S in zip(weights, states))

    # --- path 2: chunked parallel form from any state --------------------------------------
    def chunked(self, x: torch.Tensor, st: LayerState, pos: int | list[int], scan=None,
                lengths: list[int] | None = None) -> torch.Tensor:
        """Process x [B,T,d] from state `st` (updated): every row from absolute position `pos`,
        or (packed prefill) row b from `pos[b]`, reading its first `lengths[b]` tokens (the
        rest of its row is padding, and its output there is garbage). `st.ckpt_mask` marks the
        real checkpoints of rows with fewer than others; the new ones of each row follow the old
        ones of the widest row (models/chunk_layout.py lays the rows on the chunk grid).

        `scan` optionally replaces the chunk-to-chunk loop with fused kernels: `scan.gated` of
        `chunk_prefill_ref`'s contract for gated linear memories (from q, k, v, log_a directly),
        `scan.terms` of `chunk_scan_terms_ref`'s for the others (after `chunk_terms`, e.g. the
        delta rule's triangular solve). The engine passes the Triton ones."""
        c = self.config
        B, T = x.shape[:2]
        starts = list(pos) if isinstance(pos, (list, tuple)) else [pos] * B
        layout = ChunkLayout(starts, list(lengths) if lengths is not None else [T] * B, self.chunk_size,
                             c.segment_size)
        p = self.project(x, st.conv_tail)
        st.conv_tail = p.conv_tail if min(layout.lengths) == T else p.conv_tail_at(layout.lengths)
        q, k, v, u, log_a, beta = map(layout.to_grid, (p.q, p.k, p.v, p.u, p.log_a, p.beta))
        if scan is not None:
            chunks = self._fused_chunks(scan, q, k, v, log_a, beta, st.online, layout)
        else:
            per_chunk = self.memory.chunk_terms(q, k, v, log_a, beta).unbind()
            chunks = (lambda n, M: self.memory.chunk_advance(per_chunk[n], M))
        n_old = st.ckpts.shape[2]
        online, key_sum_at_start = self._scan(chunks, k, st, p, layout)
        if c.aggregation == "none" or st.ckpts.shape[2] == 0:
            y = online
        else:
            # Checkpoints each row sees at each chunk: its old ones, and those it made before [B,N].
            seen = torch.tensor([[n_old + made for made in row] for row in layout.new_before], device=x.device)
            if c.aggregation == "residual":
                y = online + self._chunked_residual(q, st, seen)
            else:
                y = self._chunked_gated(q, u, k, online, st, seen, key_sum_at_start, layout)
        return self.finish(layout.from_grid(y.flatten(2, 3)), p, x)

    def _fused_chunks(self, scan, q, k, v, log_a, beta, M0, layout: ChunkLayout):
        """Run the fused chunk-scan kernels up front; returns `chunks(n, M)` -> the read-outs and
        state of chunk n, like `chunk_advance` (the kernels apply the resets)."""
        B, H, N, L, dk = q.shape
        resets = torch.tensor([[e and self.config.boundary == "reset" for e in row] for row in layout.ends],
                              dtype=torch.int32, device=q.device)  # [B,N]
        if not self.memory.fusable_scan:
            t = self.memory.chunk_terms(q, k, v, log_a, beta)
            # One launch when every row resets at the same chunks, else one per row.
            groups = [slice(0, B)] if bool((resets == resets[0]).all()) else [slice(b, b + 1) for b in range(B)]
            outs, states = [], []
            for rows in groups:
                heads = lambda x: None if x is None else x[rows].flatten(0, 1)
                o, s = scan.terms(heads(t.q_decayed), heads(t.attn), heads(t.values), heads(t.w),
                                  heads(t.k_to_end), heads(t.gamma_end), heads(M0), resets[rows.start])
                outs.append(o.unflatten(0, (-1, H)))
                states.append(s.unflatten(0, (-1, H)))
            outs, states = torch.cat(outs), torch.cat(states)
            return lambda n, M: (outs[:, :, n], states[:, :, n])
        flat = lambda t: t.permute(1, 2, 0, 3).flatten(0, 1)
        outs, states = [], []
        for b in range(B):
            o, per_chunk, _ = scan.gated(flat(q[b]), flat(k[b]), flat(v[b]), log_a[b].flatten(1).T, M0[b], L,
                                         resets[b])
            outs.append(o.view(N, L, H, -1).permute(2, 0, 1, 3))    # [H,N,L,dv]
            states.append(per_chunk)                                  # [N,H,dk,dv]
        outs, states = torch.stack(outs), torch.stack(states)
        return lambda n, M: (outs[:, :, n], states[:, n])

    def _scan(self, chunks, k, st: LayerState, p: Projected, layout: ChunkLayout):
        """Carry the state chunk by chunk (the only sequential part), caching a checkpoint at
        every segment end (of the rows whose segment ends there). `chunks(n, M)` gives chunk
        n's online read-outs and the state after it. Returns the online read-outs
        [B,H,N,L,dv] and the key sum entering each chunk [B,H,N,dk]."""
        M, key_sum = st.online, st.key_sum
        online, key_sum_at_start, made = [], [], []
        k_chunk_sums = k.sum(dim=3)
        for n in range(layout.n_chunks):
            out, M = chunks(n, M)
            online.append(out)
            key_sum_at_start.append(key_sum)
            key_sum = key_sum + k_chunk_sums[:, :, n]
            ends = layout.ends_at(n)
            if any(ends):
                rows = None if all(ends) else torch.tensor(ends, device=k.device)
                checkpoint, summary, M, key_sum = self.close_segment(M, key_sum, rows)
                made.append((n, checkpoint, summary))
        st.online, st.key_sum = M, key_sum
        if made:
            self._append_checkpoints(st, p, layout, made)
        return torch.stack(online, dim=2), torch.stack(key_sum_at_start, 2)

    @staticmethod
    def _append_checkpoints(st: LayerState, p: Projected, layout: ChunkLayout, made) -> None:
        """Append the checkpoints the scan made to `st`: `made` lists (chunk, checkpoint [B,...],
        summary [B,...]) for every chunk where some row's segment ended; row b keeps those of its
        own ends, in order, padded to the row that made the most (masked in `st.ckpt_mask`)."""
        B, n_old = st.ckpts.shape[0], st.ckpts.shape[2]
        ckpts = torch.stack([c for _, c, _ in made], 2)      # [B,H,m,dk,dv]
        summaries = torch.stack([s for _, _, s in made], 2)  # [B,H,m,dk]
        most = max(layout.num_new)
        # pick[b][j]: which of `made` is row b's j-th new checkpoint (0 for padding)
        pick = [[i for i, (n, _, _) in enumerate(made) if layout.ends[b][n]] for b in range(B)]
        padded = lambda row: row + [0] * (most - len(row))
        offsets = [padded([layout.end_offset(b, made[i][0]) for i in row]) for b, row in enumerate(pick)]
        pick = [padded(row) for row in pick]
        if layout.same_ends:  # every row ended at every chunk of `made`
            new_ckpts, new_summaries = ckpts, summaries
        else:
            rows = torch.arange(B, device=ckpts.device)[:, None]
            index = torch.tensor(pick, device=ckpts.device)
            new_ckpts = ckpts[rows, :, index].transpose(1, 2)
            new_summaries = summaries[rows, :, index].transpose(1, 2)
        st.ckpts = torch.cat([st.ckpts, new_ckpts], 2)
        st.summaries = torch.cat([st.summaries, new_summaries], 2)
        if st.ckpt_conv is not None:
            st.ckpt_conv = torch.cat([st.ckpt_conv, p.conv_tail_at(offsets)], 1)
        if st.ckpt_mask is not None or not layout.same_ends:
            old = st.ckpt_mask if st.ckpt_mask is not None else torch.ones(B, n_old, dtype=torch.bool,
                                                                           device=ckpts.device)
            real = torch.arange(most, device=ckpts.device)[None, :] < torch.tensor(layout.num_new,
                                                                                 device=ckpts.device)[:, None]
            st.ckpt_mask = torch.cat([old, real], 1)

    def _chunked_residual(self, q, st: LayerState, seen):
        # Linear read-out: sum_i C_i^T q = (sum_i C_i)^T q, with a prefix sum over checkpoints
        # (those masked out as padding count as zero; a row never sees past its own).
        cached = st.ckpts if st.ckpt_mask is None else st.ckpts * st.ckpt_mask[:, None, :, None, None]
        prefix = F.pad(cached.cumsum(2), (0, 0, 0, 0, 1, 0))  # [B,H,n+1,dk,dv]
        rows = torch.arange(q.shape[0], device=q.device)[:, None]
        sums = prefix[rows, :, seen].transpose(1, 2)          # [B,H,N,dk,dv]
        return q @ sums

    def _chunked_gated(self, q, u, k, online, st: LayerState, seen, key_sum_at_start, layout: ChunkLayout):
        c = self.config
        cached, summaries = st.ckpts, st.summaries
        B, H, N, L, dk = q.shape
        # Online summary: running mean of this segment's keys up to and including t.
        count = (layout.positions(q.device) % c.segment_size + 1).to(q.dtype)[:, None]  # [B,1,N,L]
        running = key_sum_at_start[:, :, :, None] + k.cumsum(3)
        online_r = self._score(u, running / count[..., None])  # [B,H,N,L]
        cached_r = torch.einsum("bhnlk,bhik->bhnli", u, summaries) * c.score_scale
        n_total = cached.shape[2]
        mask = torch.arange(n_total, device=q.device)[None, None, :] < seen[:, :, None]  # [B,N,n]
        if st.ckpt_mask is not None:
            mask = mask & st.ckpt_mask[:, None, :]
        g_cached, g_online = gate_weights(cached_r, online_r, mask[:, None, :, None, :], c.aggregation, c.ssc_top_k)
        y = g_online[..., None] * online
        # sum_i g_i C_i^T q as one matmul per chunk over the checkpoints it sees: [L, i*dk] @ [i*dk, dv]
        # (up to the most any row sees; the others' gates are zero there). Unbound once: indexing
        # chunk n in the loop would cost a full-size zero tensor per chunk in the backward.
        cached_flat = cached.flatten(2, 3)  # [B,H,n*dk,dv]
        reads = []
        most_seen = seen.amax(0).tolist()
        for upto, g_n, q_n, online_n in zip(most_seen, g_cached.unbind(2), q.unbind(2), online.unbind(2)):
            if upto == 0:
                reads.append(torch.zeros_like(online_n))
                continue
            weighted_q = (g_n[..., :upto, None] * q_n[..., None, :]).flatten(3)
            reads.append(weighted_q @ cached_flat[:, :, :upto * dk])
        return y + torch.stack(reads, dim=2)

    # --- path 3: one decode step -----------------------------------------------------------
    def step(self, x: torch.Tensor, st: LayerState, pos: int) -> torch.Tensor:
        """One token x [B,1,d] at absolute position `pos` for every sequence of `st` (updated)."""
        c = self.config
        y, M, key_sum = self.decode_step(x, st, pos)
        if (pos + 1) % c.segment_size == 0:
            checkpoint, summary, M, key_sum = self.close_segment(M, key_sum)
            st.append_checkpoint(checkpoint, summary, st.conv_tail)
        st.online, st.key_sum = M, key_sum
        return y

    def decode_step(self, x: torch.Tensor, st: LayerState, pos: int | torch.Tensor, source=None,
                    online_step=None):
        """The read-out of one token per sequence, without the segment-end bookkeeping.

        `pos` is one position for all, or a LongTensor [B] (the engine batches sequences at
        different positions). The two seams of a decode backend: checkpoints come from `source`
        (models/checkpoints.py; by default the state's own); `online_step(q, k, v, log_a, beta)`,
        if given, updates the online memories where the backend keeps them and returns their
        read-outs (by default the memory's `update` on `st.online`). Updates the conv tail;
        returns (output [B,1,d], online memory after the token or None if the backend keeps it,
        key sum after the token).
        """
        c, mem = self.config, self.memory
        source = source or DenseCheckpoints(st)
        p = self.project(x, st.conv_tail)
        st.conv_tail = p.conv_tail
        q, k, v, log_a = p.q[:, :, 0], p.k[:, :, 0], p.v[:, :, 0], p.log_a[:, :, 0]
        beta = p.beta[:, :, 0] if p.beta is not None else None
        if online_step is None:
            M = mem.update(st.online, k, v, log_a, beta)
            online = mem.read(M, q)
        else:
            M, online = None, online_step(q, k, v, log_a, beta)
        key_sum = st.key_sum + k
        if c.aggregation == "none" or source.count == 0:
            y = online
        else:
            u, r_online = (p.u[:, :, 0], None) if c.scores_segments else (None, None)
            if c.scores_segments:
                count = pos % c.segment_size + 1
                if isinstance(count, torch.Tensor):
                    count = count.view(-1, 1, 1).to(key_sum.dtype)
                r_online = self._score(u, key_sum / count)
            cached, g_online = source.read(q, u, r_online, c)
            y = g_online[..., None] * online + cached
        return self.finish(y[:, :, None], p, x), M, key_sum

    # --- the segment end, and restarting from a checkpoint ---------------------------------
    def close_segment(self, M: torch.Tensor | None, key_sum: torch.Tensor, ends: torch.Tensor | None = None):
        """The segment-end rule, the one place it is written: the online memory M becomes the
        segment's checkpoint, with the mean of the segment's keys as its summary; the key sum
        restarts at zero, and so does M under boundary "reset". `ends` [B] bool applies it to
        some rows only (a decode batch at different positions). M is None when the backend
        keeps the memories in a pool: the segment_end op (mckernels/segment_end: the same rule)
        updates them in place. Returns (checkpoint, summary, M after, key sum after)."""
        reset = self.config.boundary == "reset"
        summary = key_sum / self.config.segment_size
        if ends is None:
            M_after = torch.zeros_like(M) if reset and M is not None else M
            return M, summary, M_after, torch.zeros_like(key_sum)
        keep = (~ends).to(key_sum.dtype)
        M_after = M * keep[:, None, None, None] if reset and M is not None else M
        return M, summary, M_after, key_sum * keep[:, None, None]

    def restart_online(self, checkpoint: torch.Tensor) -> torch.Tensor:
        """The online memory of a sequence restarted at the end of a segment from its checkpoint
        (prefix reuse, a session that diverges, a rewind): the checkpoint itself under boundary
        "carry", zeros under "reset"."""
        if self.config.boundary == "carry":
            return checkpoint.float().clone()
        return torch.zeros_like(checkpoint, dtype=torch.float32)


class MCMixer(Mixer):
    """mcserve's own parametrisation: one input projection (q, k, v, the output gate, u), a short
    convolution over q, k, v, L2-normalised q and k, per-head RMSNorm and a sigmoid gate."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        c = config
        H, dk, dv, d = c.n_heads, c.dk, c.dv, c.d_model
        # One input projection: q, k, v lead it, so that they are one split of it (a view, and one
        # concatenation in the backward); then the output gate and (if scored) the connector u.
        self.qkv_splits = [H * dk, H * dk, H * dv]
        self.proj_splits = [sum(self.qkv_splits), H * dv] + ([H * dk] if c.scores_segments else [])
        self.in_proj = nn.Linear(d, sum(self.proj_splits), bias=False)
        self.conv = ShortConv(sum(self.qkv_splits), c.conv_size) if c.conv_size else None
        self.head_norm = RMSNorm(dv, c.norm_eps)
        self.o_proj = nn.Linear(H * dv, d, bias=False)

    def project(self, x: torch.Tensor, conv_tail: torch.Tensor | None) -> Projected:
        c = self.config
        H, dk, dv = c.n_heads, c.dk, c.dv
        qkv, gate, *u = self.in_proj(x).split(self.proj_splits, dim=-1)
        conv_window = None
        if self.conv is not None:
            conv_window = self.conv.window(qkv, conv_tail)
            qkv, conv_tail = self.conv.convolve(conv_window)
        q, k, v = qkv.float().split(self.qkv_splits, dim=-1)
        # Normalised per head before the heads-first transpose: a contiguous last dim is ~2x faster.
        normed = lambda t: F.normalize(t.unflatten(-1, (H, dk)), dim=-1, eps=1e-6).transpose(1, 2)
        heads = lambda t, dim: t.unflatten(-1, (H, dim)).transpose(1, 2)
        log_a, beta = self.memory.gates(x)
        return Projected(
            q=normed(q), k=normed(k), v=heads(v, dv),
            u=heads(u[0].float(), dk) if c.scores_segments else None,
            log_a=log_a, beta=beta, gate=gate, conv_tail=conv_tail, conv_window=conv_window)

    def mc_parameters(self) -> dict[str, slice | None]:
        """u is the last block of in_proj's rows."""
        if not self.config.scores_segments:
            return {}
        return {"in_proj.weight": slice(sum(self.proj_splits[:2]), None)}

    def finish(self, y: torch.Tensor, p: Projected, x: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm, the sigmoid output gate, W_o."""
        y = self.head_norm(y).transpose(1, 2).flatten(2)
        return self.o_proj((y * torch.sigmoid(p.gate.float())).to(x.dtype))
