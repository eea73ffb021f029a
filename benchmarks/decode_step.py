"""The engine's decode step, timed alone (a script, not a test).

    python -m benchmarks.decode_step --dtype bf16 --compile

A batch of sequences reads random prompts (untimed), decodes a few warm-up steps, then every
step is timed: one token for every sequence, so ms/step is the batch's inter-token latency with
no server around it. Segment ends fall inside the timed steps as they do when serving. Prints
one JSON line (median and mean ms/step), so that two checkouts can be compared in turns:

    for i in 1 2 3; do (cd ../old && python -m benchmarks.decode_step); python -m benchmarks.decode_step; done
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

import models
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.params import SamplingParams


def time_steps(engine: LLMEngine, batch: int, prompt_len: int, warmup: int, steps: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    vocab = engine.model.config.vocab_size
    params = SamplingParams(max_tokens=warmup + steps + 8, temperature=0.0, ignore_eos=True)
    for _ in range(batch):
        engine.add_request([rng.randrange(vocab) for _ in range(prompt_len)], params)
    while any(s.num_computed_tokens < len(s.prompt_ids) for s in engine.sequences.values()):
        engine.step()  # the prompts, untimed
    for _ in range(warmup):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the bundled model)")
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"), help="the weights' dtype")
    parser.add_argument("--compile", action="store_true", help="--compile-decode (graphs cached on disk)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = models.load(args.model or models.default_model_path(), dtype=dtype)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=max(args.batch, 1), compile_decode=args.compile))
    times = time_steps(engine, args.batch, args.prompt_len, args.warmup, args.steps, args.seed)
    print(json.dumps({"batch": args.batch, "dtype": args.dtype, "compile": args.compile,
                      "ckpt_dtype": engine.config.ckpt_dtype, "prompt_len": args.prompt_len, "steps": args.steps,
                      "median_ms": round(statistics.median(times) * 1e3, 2),
                      "mean_ms": round(statistics.fmean(times) * 1e3, 2)}))


if __name__ == "__main__":
    main()
