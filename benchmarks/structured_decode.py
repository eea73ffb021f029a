"""What a JSON schema constraint costs the decode loop: tokens/s at batch 1 and 32 on the bundled
model, with and without the constraint, run side by side (interleaved in ABBA order; the cost is the
median over adjacent pairs).

    python -m benchmarks.structured_decode [--tokens 128] [--batches 1,32] [--repeats 8]

Two schemas: "record", an object of the usual kinds of fields, and "long_string", one string
that must be longer than any output (the worst case: its lexer is large, and no output ends
early). A constrained output may end before --tokens, so each free sequence decodes exactly as
many tokens as its constrained twin did (seeded sampling makes the constrained runs repeat
themselves): both runs see the same batch sizes step by step.
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

RECORD = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "email", "tags", "address", "summary"],
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,6}$"},
                         "tags": {"type": "array", "items": {"enum": ["new", "vip", "churned", "trial"]}},
                         "address": {"type": "object", "required": ["city", "zip"],
                                     "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}},
                         "summary": {"type": "string"}}}


def long_string(min_chars: int) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["story"],
            "properties": {"story": {"type": "string", "minLength": min_chars}}}


def run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[float, list[int]]:
    """Decode tokens/s of one batch, prefill excluded (timed from the first sampled token), and
    each sequence's number of output tokens."""
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while not all(s.output_ids for s in seqs):
        engine.step()
    started, before = time.perf_counter(), sum(len(s.output_ids) for s in seqs)
    while engine.has_unfinished():
        engine.step()
    tokens = sum(len(s.output_ids) for s in seqs) - before
    return tokens / (time.perf_counter() - started), [len(s.output_ids) for s in seqs]


def compare(engine: LLMEngine, prompts: list[list[int]], schema: dict, tokens: int, repeats: int) -> dict:
    eos = tuple(engine.tokenizer.eos_ids)
    constrained = SamplingParams(max_tokens=tokens, temperature=1.0, seed=0, stop_token_ids=eos,
                                 constraint=Constraint("json_schema", json.dumps(schema)))
    _, lengths = run(engine, prompts, [constrained] * len(prompts))
    params = {"json_schema": [constrained] * len(prompts),
              "free": [SamplingParams(max_tokens=n, temperature=1.0, seed=0, ignore_eos=True, stop_token_ids=eos)
                       for n in lengths]}
    runs: dict[str, list[float]] = {"free": [], "json_schema": []}
    for r in range(repeats):  # ABBA order: a drift of the machine falls on both alike
        for name in ("free", "json_schema") if r % 2 == 0 else ("json_schema", "free"):
            tps, got = run(engine, prompts, params[name])
            assert got == lengths, "a repeat decoded other lengths than the calibration run"
            runs[name].append(round(tps, 1))
    free, constrained_tps = (statistics.median(runs[k]) for k in ("free", "json_schema"))
    # The cost from each adjacent pair, then their median: the machine's slow drifts cancel in a pair.
    pair_costs = [1 - c / f for f, c in zip(runs["free"], runs["json_schema"])]
    return {"free_tok_s": round(free, 1), "json_schema_tok_s": round(constrained_tps, 1),
            "cost": round(statistics.median(pair_costs), 3), "mean_output_tokens": round(statistics.mean(lengths), 1),
            "runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--schemas", default="record,long_string")
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args(argv)
    model = models.load(models.default_model_path())
    tok = model.tokenizer
    engine = LLMEngine(model, EngineConfig(max_num_seqs=32, num_device_blocks=1024, num_host_blocks=0))
    schemas = {"record": RECORD, "long_string": long_string(8 * args.tokens)}
    text = "Call me Ishmael. Some years ago, never mind how long precisely, having little money in my purse"
    print(f"bundled model, up to {args.tokens} tokens per sequence, torch threads {torch.get_num_threads()}")
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [tok.encode(f"{text} ({i})") for i in range(batch)]
        run(engine, prompts[:1], [SamplingParams(max_tokens=8)])  # warm-up
        for name in args.schemas.split(","):
            result = compare(engine, prompts, schemas[name], args.tokens, args.repeats)
            print(json.dumps({"batch": batch, "schema": name, **result}), flush=True)


if __name__ == "__main__":
    main()
