"""ModelRunner: owns every state tensor and runs batched steps over slots and block tables.

Pools (all layers in one tensor each, indexed [layer, id, ...]):
- checkpoint blocks, one per finished segment of a sequence: `ckpt` [L,N,H,dk,dv] (fp32 or bf16
  storage, read in fp32), `summary` [L,N,H,dk], `block_conv` [L,N,W-1,C] (the conv tail at the
  boundary, so a sequence can restart from any block: prefix reuse, session divergence);
- online slots, one per running sequence: `online` [L,S,H,dk,dv] (fp32), `key_sum` [L,S,H,dk],
  `conv_tail` [L,S,W-1,C];
- a host copy of the block pool for swapping (same layout, CPU memory).

The math is the model's own: prefill runs `Mixer.chunked` on a state gathered from the pools
(with its chunk loop on `mckernels/chunk_prefill` when the Triton path is on); decode runs
`Mixer.decode_step` through a decode backend (engine/decode_backends.py: torch, or the Triton
kernels in place on the pools) and `Mixer.close_segment` for the segment end. This file only
moves data in and out of the pools.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch._inductor.config as inductor_config

from models import MCModel
from models.state import LayerState

from .config import EngineConfig
from .cuda_graphs import DecodeGraphs
from .decode_backends import PrefillKernels, TorchDecode, TritonDecode

STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def compiled_decode(math):
    """The decode math under torch.compile (Inductor; C++ on the CPU). Shapes are dynamic, so one
    graph serves every batch size and block-table width; torch specializes sizes 0 and 1, and
    `precompile_decode` builds those graphs at start. The pools are read, never written, inside
    the graph: a written pool would be copied whole on every step. The weights are frozen into
    the graph (Inductor's `freezing`): on the CPU its linears run on prepacked oneDNN weights,
    10-20% of a bf16 step (docs/benchmarks.md); the pools, not parameters, stay inputs."""
    compiled = torch.compile(math, dynamic=True)

    def run(*args, **kwargs):
        # Set around every call, not given as `options`: graphs compile lazily (and again for a
        # new shape), and torch.compile's options do not reach the freezing pass.
        with inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)
    return run


class ModelRunner:
    def __init__(self, model: MCModel, config: EngineConfig):
        weights = model.embed.weight
        self.model, self.config = model.eval(), config.for_weights("bf16" if weights.dtype == torch.bfloat16 else "fp32")
        c = model.config
        self.device = weights.device
        self.segment_size = c.segment_size
        self.carry = c.boundary == "carry"
        L, H, dk, dv = c.n_layers, c.n_heads, c.dk, c.dv
        conv = model.blocks[0].mixer.conv
        conv_shape = (conv.width - 1, conv.weight.shape[0]) if conv is not None else None
        store = STORAGE_DTYPES[self.config.ckpt_dtype]

        def pool(n: int, device) -> dict[str, torch.Tensor]:
            tensors = {"ckpt": torch.zeros(L, n, H, dk, dv, dtype=store, device=device),
                       "summary": torch.zeros(L, n, H, dk, device=device)}
            if conv_shape:
                tensors["block_conv"] = torch.zeros(L, n, *conv_shape, device=device)
            return tensors

        self.use_triton = config.kernels == "triton" or (config.kernels == "auto" and self.device.type == "cuda")
        self.scan = PrefillKernels() if self.use_triton else None
        self.backend = TritonDecode if self.use_triton else TorchDecode
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
        self.decode_math = self._decode_math
        if config.compile_decode and not self.use_triton:
            self.decode_math = compiled_decode(self._decode_math)

    # --- sizes -----------------------------------------------------------------------------
    @functools.cached_property
    def block_nbytes(self) -> int:
        """Bytes of one checkpoint block, all layers (fixed: read by every stats snapshot)."""
        return sum(t[:, 0].numel() * t.element_size() for t in self.blocks.values())

    # --- slots -----------------------------------------------------------------------------
    def init_slot(self, slot: int, last_block: int | None) -> None:
        """Start a slot empty, or at the boundary after `last_block` (a reused prefix)."""
        for t in self.slots.values():
            t[:, slot] = 0
        if last_block is None:
            return
        for layer, block in enumerate(self.model.blocks):
            self.slots["online"][layer, slot] = block.mixer.restart_online(self.blocks["ckpt"][layer, last_block])
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
    def prefill(self, slots: list[int], block_tables: list[list[int]], starts: list[int],
                tokens: list[list[int]], new_blocks: list[list[int]]) -> torch.Tensor:
        """Packed prefill: in one forward, sequence b reads `tokens[b]` at positions
        [starts[b], starts[b] + len) into `slots[b]`, and the checkpoints of the segments that end
        inside go to `new_blocks[b]`. Returns the logits of each sequence's last token [B,V]."""
        lengths = [len(t) for t in tokens]
        width = max(lengths)
        states = [self._gather(i, slots, block_tables) for i in range(len(self.model.blocks))]
        ids = torch.tensor([t + [0] * (width - len(t)) for t in tokens], device=self.device)
        last = torch.tensor([n - 1 for n in lengths], device=self.device)
        logits = self.model.run_layers(ids, lambda i, mixer, x: mixer.chunked(x, states[i], starts, self.scan,
                                                                             lengths), at=last)
        # Each row's new checkpoints follow the old ones of the longest block table.
        first_new = max(len(t) for t in block_tables)
        rows = [b for b, blocks in enumerate(new_blocks) for _ in blocks]
        if rows:
            row_index = torch.tensor(rows, device=self.device)
            ckpt_index = torch.tensor([first_new + j for blocks in new_blocks for j in range(len(blocks))],
                                      device=self.device)
            targets = [block for blocks in new_blocks for block in blocks]
        for i, st in enumerate(states):
            if rows:
                self._write_new_blocks(i, targets, st.ckpts[row_index, :, ckpt_index],
                                       st.summaries[row_index, :, ckpt_index],
                                       st.ckpt_conv[row_index, ckpt_index] if st.ckpt_conv is not None else None)
            self._scatter(i, slots, st)
        return logits

    @torch.inference_mode()
    def decode(self, slots: list[int], block_tables: list[list[int]], positions: list[int],
               tokens: list[int], new_blocks: list[int | None]) -> torch.Tensor:
        """One token per sequence at its own position; a sequence whose segment ends writes its
        checkpoint to its entry of `new_blocks`. Returns logits [B, V]."""
        batch = self.decode_batch(slots, block_tables, positions, tokens, new_blocks)
        with self.decode_threads():
            if self.graphs is not None:
                return self.graphs.run(batch)
            # Off the static path the host knows which rows end a segment: only their blocks
            # are written (most steps none), not every row's to the spare block.
            ending = None if self.use_triton else torch.tensor(
                [b for b, block in enumerate(new_blocks) if block is not None], dtype=torch.long, device=self.device)
            return self.decode_static(**batch, ending=ending)

    @contextlib.contextmanager
    def decode_threads(self):
        """The CPU decode step on `config.decode_threads` torch threads (the compiled one is built
        under it too: Inductor fixes its thread count when it generates code)."""
        threads, before = self.config.decode_threads, torch.get_num_threads()
        if self.device.type != "cpu" or not threads or threads == before:
            yield
            return
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def decode_batch(self, slots, block_tables, positions, tokens, new_blocks, rows: int | None = None,
                     width: int | None = None) -> dict[str, torch.Tensor]:
        """The decode step's inputs as tensors, padded to `rows` x `width` (a CUDA graph's bucket):
        padded rows use the spare slot and read no checkpoints."""
        B = len(slots)
        rows, width = rows or B, max(width or 0, max((len(t) for t in block_tables), default=0))
        pad = rows - B
        table = [t + [0] * (width - len(t)) for t in block_tables] + [[0] * width] * pad
        ends = [-1 if b is None else b for b in new_blocks] + [-1] * pad
        as_tensor = lambda values, dtype=torch.long: torch.tensor(values, dtype=dtype).to(self.device)
        return {"tokens": as_tensor(tokens + [0] * pad), "positions": as_tensor(positions + [0] * pad),
                "slot_ids": as_tensor(slots + [self.trash_slot] * pad),
                "table": as_tensor(table, torch.int32).view(rows, width),
                "lengths": as_tensor([len(t) for t in block_tables] + [0] * pad, torch.int32),
                "end_blocks": as_tensor(ends)}

    def decode_static(self, tokens, positions, slot_ids, table, lengths, end_blocks,
                      ending: torch.Tensor | None = None) -> torch.Tensor:
        """The decode step with no host-side branching (so it can be captured in a CUDA graph):
        which rows end a segment is known only on the device. A row's segment ends by its
        position; its checkpoint goes to its block of `end_blocks` (every other row writes to
        the spare block). With `ending` (the rows that write a block, known on the host), only
        those rows' blocks are written."""
        logits, rows, targets, layers = self.decode_math(tokens, positions, slot_ids, table, lengths, end_blocks)
        self._write_decode(slot_ids, rows, targets, layers, ending)
        return logits

    def precompile_decode(self, progress=None) -> None:
        """Build the compiled decode graphs before the first request: the batch sizes 1 and 2+
        by the block-table widths 0, 1 and 2+ (torch specializes sizes 0 and 1). The dummy
        steps only read the pools. `progress(done, total)` is called after each."""
        if self.decode_math is self._decode_math:
            return  # not compiled (the Triton path): nothing to build
        shapes = [(rows, width) for rows in (1, 2) for width in (0, 1, 2)]
        for done, (rows, width) in enumerate(shapes, start=1):
            with torch.inference_mode(), self.decode_threads():  # as `decode` runs: graphs are guarded on it
                batch = self.decode_batch([self.trash_slot] * rows, [[]] * rows, [0] * rows, [0] * rows,
                                          [None] * rows, width=width)
                self.decode_math(**batch)
            if progress is not None:
                progress(done, len(shapes))

    def _decode_math(self, tokens, positions, slot_ids, table, lengths, end_blocks):
        """The step's math, reading the pools and writing none of them (on the torch backend):
        the logits, and each layer's new memory, checkpoint, summary and conv tail. What
        torch.compile compiles."""
        ends = (positions + 1) % self.segment_size == 0
        rows = torch.where(ends & (end_blocks >= 0), end_blocks, self.trash_block)  # every row writes here
        targets = torch.where(ends, rows, -1)  # the segment_end kernel's form: -1 for rows that go on
        backend, layers = self.backend, []

        def mix(i: int, mixer, x: torch.Tensor) -> torch.Tensor:
            st = self._slot_state(i, slot_ids, with_online=not backend.keeps_online_in_pool)
            source = backend.checkpoints(self.blocks["ckpt"][i], self.blocks["summary"][i], table, lengths)
            y, M, key_sum = mixer.decode_step(x, st, positions, source, backend.online_step(self.slots["online"][i],
                                                                                            slot_ids))
            layers.append((*mixer.close_segment(M, key_sum, ends), st.conv_tail))
            return y

        return self.model.run_layers(tokens[:, None], mix)[:, 0], rows, targets, layers

    def _write_decode(self, slot_ids, rows, targets, layers, ending: torch.Tensor | None = None) -> None:
        """Write what the step's math gave back to the pools (layers are independent, so the
        writes may all follow the math). Block writes take the rows of `ending` only, if given."""
        conv = self.slots.get("conv_tail")
        keep = (lambda t: t[ending]) if ending is not None else (lambda t: t)
        rows = keep(rows)
        for i, (checkpoint, summary, M, key_sum, conv_tail) in enumerate(layers):
            self.backend.end_segments(self.slots["online"][i], slot_ids, targets, rows, self.blocks["ckpt"][i],
                                      None if checkpoint is None else keep(checkpoint), M, reset=not self.carry)
            self.blocks["summary"][i].index_copy_(0, rows, keep(summary))
            self.slots["key_sum"][i].index_copy_(0, slot_ids, key_sum)
            if conv is not None:
                conv_tail = conv_tail.float()  # in the weights' dtype
                self.blocks["block_conv"][i].index_copy_(0, rows, keep(conv_tail))
                conv[i].index_copy_(0, slot_ids, conv_tail)

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
            self.slots["conv_tail"][layer][index] = st.conv_tail.float()  # in the weights' dtype

    def _write_new_blocks(self, layer: int, ids: list[int], ckpts: torch.Tensor, summaries: torch.Tensor,
                          convs: torch.Tensor | None) -> None:
        """ckpts [n,H,dk,dv], summaries [n,H,dk], convs [n,W-1,C] -> pool rows `ids`."""
        index = torch.tensor(ids, device=self.device)
        self.blocks["ckpt"][layer][index] = ckpts.to(self.blocks["ckpt"].dtype)
        self.blocks["summary"][layer][index] = summaries
        if convs is not None:
            self.blocks["block_conv"][layer][index] = convs.float()
