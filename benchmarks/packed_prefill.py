"""What packed prefill is worth: prefill tokens/s of the bundled model when a step's B new
prompts read their chunks in one forward, against one forward per sequence (the design before
packing), on the same ModelRunner, in ABBA order (the speed-up is the median over adjacent
pairs). Cold prompts: every run reads fresh slots and blocks; nothing is cached.

    python -m benchmarks.packed_prefill [--batches 1,4,8,16] [--lengths 64,256] [--repeats 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import models
from engine.config import EngineConfig
from engine.model_runner import ModelRunner


def prefill_all(runner: ModelRunner, prompts: list[list[int]], segment: int, packed: bool) -> float:
    """Read every prompt from position 0 into its own slot; the seconds it took."""
    blocks = iter(range(runner.config.num_device_blocks))
    new = [[next(blocks) for _ in range(len(p) // segment)] for p in prompts]
    for slot in range(len(prompts)):
        runner.init_slot(slot, None)
    started = time.perf_counter()
    if packed:
        runner.prefill(list(range(len(prompts))), [[] for _ in prompts], [0] * len(prompts), prompts, new)
    else:
        for slot, (prompt, ids) in enumerate(zip(prompts, new)):
            runner.prefill([slot], [[]], [0], [prompt], [ids])
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--lengths", default="64,256")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args(argv)
    model = models.load(models.default_model_path())
    runner = ModelRunner(model, EngineConfig(max_num_seqs=32, num_device_blocks=1024, num_host_blocks=0))
    segment, vocab = model.config.segment_size, model.config.vocab_size
    print(f"bundled model, {torch.get_num_threads()} torch threads", flush=True)
    gen = torch.Generator().manual_seed(0)
    for length in (int(x) for x in args.lengths.split(",")):
        for batch in (int(x) for x in args.batches.split(",")):
            prompts = torch.randint(0, vocab, (batch, length), generator=gen).tolist()
            for packed in (False, True):
                prefill_all(runner, prompts, segment, packed)  # warm-up
            runs: dict[str, list[float]] = {"separate": [], "packed": []}
            for r in range(args.repeats):
                for name in ("separate", "packed") if r % 2 == 0 else ("packed", "separate"):
                    seconds = prefill_all(runner, prompts, segment, name == "packed")
                    runs[name].append(round(batch * length / seconds))
            speedup = statistics.median(p / s for s, p in zip(runs["separate"], runs["packed"]))
            print(json.dumps({"length": length, "batch": batch, "separate_tok_s": statistics.median(runs["separate"]),
                              "packed_tok_s": statistics.median(runs["packed"]), "speedup": round(speedup, 2),
                              "runs": runs}), flush=True)


if __name__ == "__main__":
    main()
