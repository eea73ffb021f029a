"""ModelRunner: owns every state tensor and runs batched steps over slots and block tables.

Pools (all layers in one tensor each, indexed [layer, id, ...]):
- checkpoint blocks, one per finished segment of a sequence: `ckpt` [L,N,H,dk,dv] (fp32 or bf16
  storage, read in fp32), `summary` [L,N,H,dk], `block_conv` [L,N,W-1,C] (the conv tail at the
  boundary, so a sequence can restart from any block: prefix reuse, session divergence);
- online slots, one per running sequence: `online` [L,S,H,dk,dv] (fp32), `key_sum` [L,S,H,dk],
  `conv_tail` [L,S,W-1,C];
- a host copy of the block pool for swapping (same layout, CPU memory).

The math is the model's own: prefill runs `MCMixer.chunked` on a state gathered from the pools
(with its chunk loop on `kernels/chunk_prefill` when the Triton path is on),
decode runs `MCMixer.decode_step` on a batch gathered through padded block tables; this file
only moves data in and out of the pools and does the segment-end bookkeeping per sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models import MCModel
from models.state import LayerState

from .config import EngineConfig
from .cuda_graphs import DecodeGraphs
from .triton_path import PrefillKernels, segment_end_triton, triton_decode_step

STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class PooledCheckpoints:
    """A decode batch's checkpoints read in place from the pool through padded block tables.

    `sum_i g_i C_i` is an `embedding_bag` over rows (block, head) of the pool: each checkpoint is
    read once and nothing of size [B, n, H, dk, dv] is materialised (the torch reference of the
    cached read-out kernel). For ssc only the selected blocks are read.
    """

    def __init__(self, ckpt: torch.Tensor, summary: torch.Tensor, table: torch.Tensor,
                 mask: torch.Tensor | None):
        self.pool, self.summary, self.table, self.mask = ckpt, summary, table, mask  # pool [N,H,dk,dv]
        self.count = table.shape[1]

    def summaries(self) -> torch.Tensor:
        return self.summary[self.table].transpose(1, 2)  # [B,H,n,dk]

    def weighted_sum(self, weights: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n = weights.shape
        N, _, dk, dv = self.pool.shape
        if index is None:
            blocks = self.table[:, None, :].expand(B, H, n)
        else:
            blocks = self.table.gather(1, index.flatten(1)).view(B, H, n)
        rows = (blocks * H + torch.arange(H, device=blocks.device)[None, :, None]).flatten(0, 1)
        flat = self.pool.view(N * H, dk * dv)
        # bf16 storage reads half the bytes (4x faster here); the gates and the sum are rounded
        # to bf16 too, a relative error of ~2e-3 on top of storing the checkpoints in bf16.
        out = F.embedding_bag(rows, flat, per_sample_weights=weights.flatten(0, 1).to(flat.dtype), mode="sum")
        return out.view(B, H, dk, dv).float()

    def total(self) -> torch.Tensor:
        B, n = self.table.shape
        weights = torch.ones(B, self.pool.shape[1], n, device=self.table.device)
        if self.mask is not None:
            weights = weights * self.mask[:, None, :]
        return self.weighted_sum(weights)


class ModelRunner:
    def __init__(self, model: MCModel, config: EngineConfig):
        self.model, self.config = model.eval(), config
        c = model.config
        self.device = model.embed.weight.device
        self.segment_size = c.segment_size
        self.carry = c.boundary == "carry"
        L, H, dk, dv = c.n_layers, c.n_heads, c.dk, c.dv
        conv = model.blocks[0].mixer.conv
        conv_shape = (conv.width - 1, conv.weight.shape[0]) if conv is not None else None
        store = STORAGE_DTYPES[config.ckpt_dtype]

        def pool(n: int, device) -> dict[str, torch.Tensor]:
            tensors = {"ckpt": torch.zeros(L, n, H, dk, dv, dtype=store, device=device),
                       "summary": torch.zeros(L, n, H, dk, device=device)}
            if conv_shape:
                tensors["block_conv"] = torch.zeros(L, n, *conv_shape, device=device)
            return tensors

        self.use_triton = config.kernels == "triton" or (config.kernels == "auto" and self.device.type == "cuda")
        self.scan = PrefillKernels() if self.use_triton else None
        # One spare block and one spare slot past the allocator's ids: the static decode step
        # (Triton path, CUDA graphs) sends the writes of padded rows and of rows whose segment
        # goes on there instead of branching on the host.
        self.trash_block, self.trash_slot = config.num_device_blocks, config.max_num_seqs
        self.blocks = pool(config.num_device_blocks + 1, self.device)
        self.host_blocks = pool(config.num_host_blocks, "cpu")
        S = config.max_num_seqs + 1
        self.slots = {"online": torch.zeros(L, S, H, dk, dv, device=self.device),
                      "key_sum": torch.zeros(L, S, H, dk, device=self.device)}
        if conv_shape:
            self.slots["conv_tail"] = torch.zeros(L, S, *conv_shape, device=self.device)
        self.graphs = DecodeGraphs(self) if config.cuda_graphs and self.use_triton and self.device.type == "cuda" else None

    # --- sizes -----------------------------------------------------------------------------
    def block_nbytes(self) -> int:
        return sum(t[:, 0].numel() * t.element_size() for t in self.blocks.values())

    # --- slots -----------------------------------------------------------------------------
    def init_slot(self, slot: int, last_block: int | None) -> None:
        """Start a slot empty, or at the boundary after `last_block` (a reused prefix)."""
        for t in self.slots.values():
            t[:, slot] = 0
        if last_block is None:
            return
        if self.carry:  # the online memory continues from the checkpoint
            self.slots["online"][:, slot] = self.blocks["ckpt"][:, last_block].float()
        if "conv_tail" in self.slots:
            self.slots["conv_tail"][:, slot] = self.blocks["block_conv"][:, last_block]

    def read_slot(self, slot: int) -> dict[str, torch.Tensor]:
        return {name: t[:, slot].cpu().clone() for name, t in self.slots.items()}

    def write_slot(self, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in self.slots.items():
            t[:, slot] = tensors[name].to(t.device)

    # --- blocks ----------------------------------------------------------------------------
    def read_blocks(self, ids: list[int], tier: str = "device") -> dict[str, torch.Tensor]:
        pool = self.blocks if tier == "device" else self.host_blocks
        index = torch.tensor(ids, dtype=torch.long, device=pool["ckpt"].device)
        return {name: t[:, index].cpu() for name, t in pool.items()}

    def write_blocks(self, ids: list[int], tensors: dict[str, torch.Tensor], tier: str = "device") -> None:
        pool = self.blocks if tier == "device" else self.host_blocks
        index = torch.tensor(ids, dtype=torch.long, device=pool["ckpt"].device)
        for name, t in pool.items():
            t[:, index] = tensors[name].to(device=t.device, dtype=t.dtype)

    def copy_blocks(self, pairs: list[tuple[int, int]], src: str, dst: str) -> None:
        """Copy blocks between tiers (swap out: device -> host; swap in: host -> device)."""
        if pairs:
            self.write_blocks([d for _, d in pairs], self.read_blocks([s for s, _ in pairs], src), dst)

    # --- steps -----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, block_table: list[int], start: int, tokens: list[int],
                new_blocks: list[int]) -> torch.Tensor:
        """Read `tokens` at positions [start, start+T) into `slot`; checkpoints of the segments
        that end inside go to `new_blocks`. Returns the logits of the last token [V]."""
        n_old = len(block_table)
        states = [self._gather(i, [slot], [block_table]) for i in range(len(self.model.blocks))]
        ids = torch.tensor([tokens], device=self.device)
        logits = self.model.run_layers(ids, lambda i, mixer, x: mixer.chunked(x, states[i], start, self.scan))
        for i, st in enumerate(states):
            if new_blocks:
                self._write_new_blocks(i, new_blocks, st.ckpts[0, :, n_old:].transpose(0, 1),
                                       st.summaries[0, :, n_old:].transpose(0, 1),
                                       st.ckpt_conv[0, n_old:] if st.ckpt_conv is not None else None)
            self._scatter(i, [slot], st)
        return logits[0, -1]

    @torch.inference_mode()
    def decode(self, slots: list[int], block_tables: list[list[int]], positions: list[int],
               tokens: list[int], new_blocks: list[int | None]) -> torch.Tensor:
        """One token per sequence at its own position; a sequence whose segment ends writes its
        checkpoint to its entry of `new_blocks`. Returns logits [B, V]."""
        if self.use_triton:
            batch = self.decode_batch(slots, block_tables, positions, tokens, new_blocks)
            return self.graphs.run(batch) if self.graphs is not None else self.decode_static(**batch)
        return self._decode_torch(slots, block_tables, positions, tokens, new_blocks)

    def decode_batch(self, slots, block_tables, positions, tokens, new_blocks, rows: int | None = None,
                     width: int | None = None) -> dict[str, torch.Tensor]:
        """The decode step's inputs as tensors, padded to `rows` x `width` (a CUDA graph's bucket):
        padded rows use the spare slot and read no checkpoints."""
        B = len(slots)
        rows, width = rows or B, max(width or 0, max((len(t) for t in block_tables), default=0))
        pad = rows - B
        table = [t + [0] * (width - len(t)) for t in block_tables] + [[0] * width] * pad
        ends = [-1 if b is None else b for b in new_blocks] + [-1] * pad
        as_tensor = lambda values, dtype=torch.long: torch.tensor(values, dtype=dtype).to(self.device)  # noqa: E731
        return {"tokens": as_tensor(tokens + [0] * pad), "positions": as_tensor(positions + [0] * pad),
                "slot_ids": as_tensor(slots + [self.trash_slot] * pad),
                "table": as_tensor(table, torch.int32).view(rows, width),
                "lengths": as_tensor([len(t) for t in block_tables] + [0] * pad, torch.int32),
                "end_blocks": as_tensor(ends)}

    def decode_static(self, tokens, positions, slot_ids, table, lengths, end_blocks) -> torch.Tensor:
        """The Triton decode step with no host-side branching (so it can be captured in a CUDA
        graph): rows whose segment ends are known only on the device (`end_blocks` >= 0), and every
        other row sends its checkpoint writes to the spare block."""
        S = self.segment_size
        ends = end_blocks >= 0
        end_rows = torch.where(ends, end_blocks, self.trash_block)
        keep = (~ends).float()[:, None, None]
        conv = self.slots.get("conv_tail")

        def mix(i: int, mixer, x: torch.Tensor) -> torch.Tensor:
            st = self._slot_state(i, slot_ids, with_online=False)
            online = self.slots["online"][i]
            y, key_sum = triton_decode_step(mixer, x, st, positions, online, slot_ids, self.blocks["ckpt"][i],
                                            self.blocks["summary"][i], table, lengths)
            segment_end_triton(online, slot_ids, end_blocks, self.blocks["ckpt"][i], reset=not self.carry)
            self.blocks["summary"][i].index_copy_(0, end_rows, key_sum / S)
            self.slots["key_sum"][i].index_copy_(0, slot_ids, key_sum * keep)
            if conv is not None:
                self.blocks["block_conv"][i].index_copy_(0, end_rows, st.conv_tail)
                conv[i].index_copy_(0, slot_ids, st.conv_tail)
            return y

        return self.model.run_layers(tokens[:, None], mix)[:, 0]

    def _decode_torch(self, slots, block_tables, positions, tokens, new_blocks) -> torch.Tensor:
        pos = torch.tensor(positions, device=self.device)
        ends = [b for b, blk in enumerate(new_blocks) if blk is not None]
        end_blocks = [new_blocks[b] for b in ends]
        S = self.segment_size
        table, mask = self._padded(block_tables)

        def mix(i: int, mixer, x: torch.Tensor) -> torch.Tensor:
            st = self._slot_state(i, slots)
            source = PooledCheckpoints(self.blocks["ckpt"][i], self.blocks["summary"][i], table, mask)
            y, M, key_sum = mixer.decode_step(x, st, pos, source)
            if ends:
                conv = st.conv_tail[ends] if st.conv_tail is not None else None
                self._write_new_blocks(i, end_blocks, M[ends], key_sum[ends] / S, conv)
                key_sum[ends] = 0
                if not self.carry:
                    M[ends] = 0
            st.online, st.key_sum = M, key_sum
            self._scatter(i, slots, st)
            return y

        ids = torch.tensor(tokens, device=self.device)[:, None]
        return self.model.run_layers(ids, mix)[:, 0]

    # --- gather / scatter ------------------------------------------------------------------
    def _padded(self, tables: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block tables padded to the longest [B,n] (pads point at block 0), and the mask of
        real entries (None when all are real)."""
        longest = max((len(t) for t in tables), default=0)
        table = torch.tensor([t + [0] * (longest - len(t)) for t in tables], dtype=torch.long,
                             device=self.device).view(len(tables), longest)
        mask = torch.arange(longest, device=self.device)[None, :] < torch.tensor(
            [len(t) for t in tables], device=self.device)[:, None]
        return table, None if bool(mask.all()) else mask

    def _slot_state(self, layer: int, slots: list[int] | torch.Tensor, with_online: bool = True) -> LayerState:
        """The online part of a batch's state (without the memory itself if `with_online` is
        False: the kernels update it in place); its checkpoints are read through a source."""
        index = torch.as_tensor(slots, device=self.device)
        c = self.model.config
        empty = torch.zeros(len(slots), c.n_heads, 0, c.dk, device=self.device)
        return LayerState(
            online=self.slots["online"][layer][index] if with_online else None, key_sum=self.slots["key_sum"][layer][index],
            ckpts=empty[..., None], summaries=empty,
            conv_tail=self.slots["conv_tail"][layer][index] if "conv_tail" in self.slots else None)

    def _gather(self, layer: int, slots: list[int], tables: list[list[int]]) -> LayerState:
        """A batch LayerState with its checkpoints copied out of the pool (prefill's chunked path
        works on whole tensors)."""
        table, mask = self._padded(tables)
        st = self._slot_state(layer, slots)
        st.ckpts = self.blocks["ckpt"][layer][table].float().transpose(1, 2)          # [B,H,n,dk,dv]
        st.summaries = self.blocks["summary"][layer][table].transpose(1, 2)           # [B,H,n,dk]
        conv = self.blocks.get("block_conv")
        st.ckpt_conv = conv[layer][table] if conv is not None else None
        st.ckpt_mask = mask
        return st

    def _scatter(self, layer: int, slots: list[int], st: LayerState) -> None:
        index = torch.tensor(slots, device=self.device)
        self.slots["online"][layer][index] = st.online
        self.slots["key_sum"][layer][index] = st.key_sum
        if "conv_tail" in self.slots:
            self.slots["conv_tail"][layer][index] = st.conv_tail

    def _write_new_blocks(self, layer: int, ids: list[int], ckpts: torch.Tensor, summaries: torch.Tensor,
                          convs: torch.Tensor | None) -> None:
        """ckpts [n,H,dk,dv], summaries [n,H,dk], convs [n,W-1,C] -> pool rows `ids`."""
        index = torch.tensor(ids, device=self.device)
        self.blocks["ckpt"][layer][index] = ckpts.to(self.blocks["ckpt"].dtype)
        self.blocks["summary"][layer][index] = summaries
        if convs is not None:
            self.blocks["block_conv"][layer][index] = convs
