"""Where the tokens of a batch fall on the chunk grid of the chunked (parallel) path.

Chunks tile absolute positions: chunk n of a row covers [base + nL, base + (n+1)L), where base
is the row's start rounded down to a multiple of the chunk size L, so a segment boundary (a
multiple of L) is always a chunk end and checkpoints fall out at chunk ends.

Rows may start at different positions and read different numbers of tokens (packed prefill:
several sequences' chunks in one forward). Row b reads `lengths[b]` tokens at positions
[starts[b], starts[b] + lengths[b]); its inputs sit left-aligned in a [B, T] batch (T the longest
length, the rest padding). On the grid, row b is shifted right by `front = start % L` and padded
to N chunks. Padded positions get k = v = 0, log a = 0, b = 0: they leave the state untouched,
and their outputs are dropped.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F


class ChunkLayout:
    def __init__(self, starts: list[int], lengths: list[int], chunk: int, segment: int):
        if len(starts) != len(lengths) or not starts:
            raise ValueError("one start and one length per row")
        self.starts, self.lengths, self.chunk, self.segment = starts, lengths, chunk, segment
        self.fronts = [s % chunk for s in starts]
        self.bases = [s - f for s, f in zip(starts, self.fronts)]
        self.width = max(lengths)  # T, the batch's time axis
        self.n_chunks = max(-(-(f + t) // chunk) for f, t in zip(self.fronts, lengths))
        # Same front and length on every row: plain padding, and every row ends its segments at
        # the same chunks (the model's own batches; a packed prefill of aligned equal chunks).
        self.uniform = len(set(self.fronts)) == 1 and len(set(lengths)) == 1

    # --- segment ends ----------------------------------------------------------------------
    @cached_property
    def ends(self) -> list[list[bool]]:
        """ends[b][n]: chunk n of row b finishes a segment inside this call."""
        L, S, N = self.chunk, self.segment, self.n_chunks
        return [[(base + (n + 1) * L) % S == 0 and base + (n + 1) * L <= start + length for n in range(N)]
                for base, start, length in zip(self.bases, self.starts, self.lengths)]

    @cached_property
    def same_ends(self) -> bool:
        """Every row finishes its segments at the same chunks."""
        return all(row == self.ends[0] for row in self.ends)

    def ends_at(self, n: int) -> list[bool]:
        """Which rows finish a segment at chunk n."""
        return [row[n] for row in self.ends]

    def end_offset(self, b: int, n: int) -> int:
        """Tokens of row b's input read by the end of chunk n (where its conv tail is taken)."""
        return (n + 1) * self.chunk - self.fronts[b]

    @cached_property
    def new_before(self) -> list[list[int]]:
        """new_before[b][n]: checkpoints row b made in this call before chunk n."""
        out = []
        for row in self.ends:
            seen, counts = 0, []
            for ended in row:
                counts.append(seen)
                seen += ended
            out.append(counts)
        return out

    @cached_property
    def num_new(self) -> list[int]:
        """Checkpoints each row makes in this call."""
        return [sum(row) for row in self.ends]

    # --- moving between the [B,T] inputs and the chunk grid ---------------------------------
    def to_grid(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """[B,H,T,*] -> [B,H,N,L,*], each row shifted by its front, zero elsewhere."""
        if t is None:
            return None
        N, L = self.n_chunks, self.chunk
        if self.uniform:
            front = self.fronts[0]
            return F.pad(t, (0, 0) * (t.dim() - 3) + (front, N * L - front - t.shape[2])).unflatten(2, (N, L))
        index, valid = self._grid_index(t.device)
        padded = F.pad(t, (0, 0) * (t.dim() - 3) + (0, 1))  # a zero row at T: where padding reads
        index = torch.where(valid, index, t.shape[2])
        gathered = padded.gather(2, _expand_index(index, padded))
        return gathered.unflatten(2, (N, L))

    def from_grid(self, y: torch.Tensor) -> torch.Tensor:
        """[B,H,N*L,*] -> [B,H,T,*]: each row's read-outs back at its input positions."""
        if self.uniform:
            front = self.fronts[0]
            return y[:, :, front:front + self.width]
        fronts = torch.tensor(self.fronts, device=y.device)
        index = fronts[:, None] + torch.arange(self.width, device=y.device)[None, :]     # [B,T]
        index = index.clamp(max=y.shape[2] - 1)  # past a row's length: padding, dropped later
        return y.gather(2, _expand_index(index, y))

    def _grid_index(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """For each grid position [B, N*L], the input position it reads and whether it is real."""
        grid = torch.arange(self.n_chunks * self.chunk, device=device)[None, :]
        source = grid - torch.tensor(self.fronts, device=device)[:, None]
        valid = (source >= 0) & (source < torch.tensor(self.lengths, device=device)[:, None])
        return source.clamp(min=0), valid

    def positions(self, device) -> torch.Tensor:
        """Absolute position of every grid slot, [B,N,L]."""
        N, L = self.n_chunks, self.chunk
        return torch.tensor(self.bases, device=device)[:, None, None] + torch.arange(N * L, device=device).view(N, L)


def _expand_index(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B,P] index along dim 2 of `like` [B,H,T,*], expanded for `gather`."""
    shape = list(like.shape)
    shape[2] = index.shape[1]
    view = [index.shape[0], 1, index.shape[1]] + [1] * (like.dim() - 3)
    return index.view(view).expand(shape)
