"""Scoring the needle task on the server's own generation path.

MC models answer through `LLMEngine.generate` (continuous batching, chunked prefill, the paged
checkpoint store, greedy decode), exactly as a request to the HTTP server would be served. The
transformer baseline is not servable by the engine, so it answers by a plain greedy loop.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.params import SamplingParams
from evals.needle import NeedleExample, NeedleTask
from models.model import MCModel


def needle_examples(task: NeedleTask, lengths: list[int], depths: list[float], per_cell: int,
                    seed: int = 7_000_003) -> list[NeedleExample]:
    generator = torch.Generator().manual_seed(seed)
    return [task.example(n, d, generator) for n in lengths for d in depths for _ in range(per_cell)]


def answers_by_engine(model: MCModel, examples: list[NeedleExample]) -> list[list[int]]:
    engine = LLMEngine(model, EngineConfig(max_num_seqs=16, max_num_batched_tokens=4096))
    longest = max(len(ex.answer) for ex in examples)
    params = SamplingParams(max_tokens=longest, temperature=0.0, ignore_eos=True)
    return engine.generate([ex.prompt for ex in examples], params)


@torch.no_grad()
def answers_by_greedy_loop(model: nn.Module, examples: list[NeedleExample]) -> list[list[int]]:
    device = next(model.parameters()).device
    longest = max(len(ex.answer) for ex in examples)
    outputs = []
    for ex in examples:
        ids = torch.tensor([ex.prompt], device=device)
        for _ in range(longest):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        outputs.append(ids[0, len(ex.prompt):].tolist())
    return outputs


def needle_scores(model: nn.Module, examples: list[NeedleExample]) -> list[dict]:
    """One record per example: length, depth, and whether the number came back exactly."""
    model.eval()
    answer = answers_by_engine if isinstance(model, MCModel) else answers_by_greedy_loop
    outputs = answer(model, examples)
    return [{"seq_len": len(ex.prompt) + len(ex.answer), "depth": ex.depth,
             "correct": out[:len(ex.answer)] == ex.answer} for ex, out in zip(examples, outputs)]
