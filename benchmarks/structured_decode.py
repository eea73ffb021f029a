"""What a JSON schema constraint costs the decode loop: tokens/s at batch 1 and 32 on the bundled
model, with and without the constraint, run side by side (interleaved in ABBA order, median of repeats).

    python -m benchmarks.structured_decode [--tokens 128] [--batches 1,32] [--repeats 3]

The schema's one string has a minLength past --tokens, so a constrained output never ends early
and both runs decode the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import models
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.params import Constraint, SamplingParams


def schema(min_chars: int) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["story"],
            "properties": {"story": {"type": "string", "minLength": min_chars}}}


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> float:
    """Decode tokens/s of one batch, prefill excluded (timed from the first sampled token)."""
    seqs = [engine.add_request(p, params) for p in prompts]
    while not all(s.output_ids for s in seqs):
        engine.step()
    started, before = time.perf_counter(), sum(len(s.output_ids) for s in seqs)
    while engine.has_unfinished():
        engine.step()
    tokens = sum(len(s.output_ids) for s in seqs) - before
    return tokens / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    model = models.load(models.default_model_path())
    tok = model.tokenizer
    engine = LLMEngine(model, EngineConfig(max_num_seqs=32, num_device_blocks=1024, num_host_blocks=0))
    text = "Call me Ishmael. Some years ago, never mind how long precisely, having little money in my purse"
    free = SamplingParams(max_tokens=args.tokens, temperature=1.0, seed=0, ignore_eos=True,
                          stop_token_ids=tuple(tok.eos_ids))
    constrained = SamplingParams(max_tokens=args.tokens, temperature=1.0, seed=0, stop_token_ids=tuple(tok.eos_ids),
                                 constraint=Constraint("json_schema", json.dumps(schema(8 * args.tokens))))
    print(f"bundled model, {args.tokens} tokens per sequence, torch threads {torch.get_num_threads()}")
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [tok.encode(f"{text} ({i})") for i in range(batch)]
        run(engine, prompts[:1], free)  # warm-up
        runs = {"free": [], "json_schema": []}
        for r in range(args.repeats):  # ABBA order: a drift of the machine falls on both alike
            order = [("free", free), ("json_schema", constrained)]
            for name, params in order if r % 2 == 0 else order[::-1]:
                runs[name].append(run(engine, prompts, params))
        free_tps, json_tps = (statistics.median(runs[k]) for k in ("free", "json_schema"))
        print(json.dumps({"batch": batch, "free_tok_s": round(free_tps, 1), "json_schema_tok_s": round(json_tps, 1),
                          "cost": round(1 - json_tps / free_tps, 3), "runs": runs}))


if __name__ == "__main__":
    main()
