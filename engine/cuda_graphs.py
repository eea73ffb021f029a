"""CUDA graphs for the decode step (Triton path, CUDA only).

A decode step of a small batch is dozens of small kernel launches per layer, so at batch 1 the
CPU issuing them is the bottleneck, not the GPU. Like vLLM, we capture `ModelRunner.decode_static`
once per (batch bucket, block-table width bucket) and replay it: the step's inputs are copied into
the graph's static tensors, padded rows point at the runner's spare slot and read no checkpoints,
and `end_blocks` decides on the device which rows write a checkpoint. Graphs are captured lazily,
the first time a bucket is needed, and share one memory pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then multiples of 8 (vLLM's choice), ending with max_num_seqs."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sizes + [max_num_seqs]


def bucket(value: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= value)


def width_bucket(width: int) -> int:
    """Block-table widths are padded to 0 or a power of two, so a growing table re-captures
    only when it doubles."""
    return 0 if width == 0 else 1 << (width - 1).bit_length()


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    logits: torch.Tensor


class DecodeGraphs:
    def __init__(self, runner):
        self.runner = runner
        self.buckets = batch_buckets(runner.config.max_num_seqs)
        self.captured: dict[tuple[int, int], CapturedStep] = {}
        self.pool = torch.cuda.graph_pool_handle()
        # Rows past the batch: the spare slot, no checkpoints, no segment end.
        self.padding = {"slot_ids": runner.trash_slot, "end_blocks": -1}

    def run(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        B, width = batch["table"].shape
        key = (bucket(B, self.buckets), width_bucket(width))
        step = self.captured.get(key) or self._capture(*key)
        for name, static in step.inputs.items():
            if name == "table":
                static.zero_()
                static[:B, :width].copy_(batch[name])
            else:
                static[:B].copy_(batch[name])
                static[B:].fill_(self.padding.get(name, 0))
        step.graph.replay()
        return step.logits[:B].clone()

    def _capture(self, rows: int, width: int) -> CapturedStep:
        runner = self.runner
        inputs = runner.decode_batch([runner.trash_slot] * rows, [[]] * rows, [0] * rows, [0] * rows,
                                     [None] * rows, width=width)
        # Warm up on a side stream (compiles the Triton kernels, settles the allocator); the
        # padded inputs only touch the spare slot and block.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                runner.decode_static(**inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = runner.decode_static(**inputs)
        step = self.captured[(rows, width)] = CapturedStep(graph, inputs, logits)
        return step
