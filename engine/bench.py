"""Engine benchmark (a script, not a test).

    python -m engine.bench                      # the bundled model
    python -m engine.bench --quick              # small sizes, a smoke run

1. Decode throughput (generated tokens/s) of the LLMEngine at batch 1, 8, 32 with 0, 8, 32
   cached checkpoints per sequence (median of 3 runs), against running the same requests one
   at a time (each alone in the engine; tokens/s over the same work).
2. Time to first token of a request continuing a long conversation: resumed from its saved
   session (memory tier, then disk tier after a restart) versus prefilling it from scratch.

Greedy outputs of the batched and the one-at-a-time runs are compared before any number is shown.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

import models

from .config import EngineConfig
from .llm_engine import LLMEngine
from .params import SamplingParams
from .sessions import SessionStore


def decode_rate(engine: LLMEngine, prompts: list[list[int]], steps: int) -> tuple[float, list[list[int]]]:
    """Prefill all prompts (untimed), then time `steps` decode steps of the whole batch."""
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0)
    seqs = [engine.add_request(p, params) for p in prompts]
    while any(not s.output_ids for s in seqs):
        engine.step()
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    elapsed = time.perf_counter() - start
    return len(prompts) * steps / elapsed, [s.output_ids for s in seqs]


def bench_decode(model, batches, ckpt_counts, steps, config, repeats=3) -> list[str]:
    S = model.config.segment_size
    rows = []
    decode_rate(LLMEngine(model, config), [[1] * (2 * S + 1)] * 2, 8)  # warm-up: allocator, caches
    gen = torch.Generator().manual_seed(0)
    for n_ckpt in ckpt_counts:
        for batch in batches:
            prompts = [torch.randint(0, model.config.vocab_size, (n_ckpt * S + 1,), generator=gen).tolist()
                       for _ in range(batch)]
            runs = [decode_rate(LLMEngine(model, config), prompts, steps) for _ in range(repeats)]
            batched, out_b = sorted(runs, key=lambda r: r[0])[len(runs) // 2]  # the median run
            if batch == 1:
                alone, out_a = batched, out_b
            else:
                # One at a time: the same requests, each alone in the engine.
                rates, out_a = [], []
                for p in prompts:
                    rate, out = decode_rate(LLMEngine(model, config), [p], steps)
                    rates.append(rate)
                    out_a += out
                alone = 1.0 / (sum(1.0 / r for r in rates) / len(rates))  # tokens/s over the same work
            if out_a != out_b:
                raise SystemExit(f"batched and one-at-a-time greedy outputs differ (batch {batch}, {n_ckpt} ckpts)")
            rows.append(f"| {batch} | {n_ckpt} | {batched:,.0f} | {alone:,.0f} | {batched / alone:.1f}x |")
            print(rows[-1], flush=True)
    return rows


def ttft(engine: LLMEngine, prompt: list[int], session_id: str | None) -> tuple[float, int]:
    """Seconds from the request to the step that returns its first token, and that token."""
    start = time.perf_counter()
    seq = engine.add_request(prompt, SamplingParams(max_tokens=2, temperature=0.0), session_id=session_id)
    while not seq.output_ids:
        engine.step()
    elapsed = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    if engine.sessions is not None:
        engine.sessions.flush()
    return elapsed, seq.output_ids[0]


def bench_resume(model, history: int, new: int, config) -> list[str]:
    gen = torch.Generator().manual_seed(1)
    conversation = torch.randint(0, model.config.vocab_size, (history + new,), generator=gen).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        engine = LLMEngine(model, config, SessionStore(model.fingerprint, tmp))
        ttft(engine, conversation[:history], "long")           # builds and saves the session
        engine.sessions.put("long-disk", engine.sessions.get("long"))  # a copy for the disk run
        engine.sessions.flush()  # no disk write competes with the timed runs
        t_memory, tok_memory = ttft(engine, conversation, "long")
        restarted = LLMEngine(model, config, SessionStore(model.fingerprint, tmp))  # memory tier empty
        t_disk, tok_disk = ttft(restarted, conversation, "long-disk")
        t_scratch, tok_scratch = ttft(LLMEngine(model, config), conversation, None)
        size = engine.sessions.info("long").nbytes
    if not tok_memory == tok_disk == tok_scratch:
        raise SystemExit("resumed and from-scratch first tokens differ")
    rows = [f"| re-prefill {history + new:,} tokens | {t_scratch * 1e3:,.0f} ms | 1x |",
            f"| resume, memory tier | {t_memory * 1e3:,.0f} ms | {t_scratch / t_memory:.0f}x |",
            f"| resume, disk tier (after restart) | {t_disk * 1e3:,.0f} ms | {t_scratch / t_disk:.0f}x |"]
    print(f"# session of {history:,} tokens: {size / 2**20:.0f} MiB", flush=True)
    for row in rows:
        print(row, flush=True)
    return rows


@torch.inference_mode()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the bundled model)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[0, 8, 32])
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per run")
    parser.add_argument("--history", type=int, default=16384, help="tokens in the resumed conversation")
    parser.add_argument("--ckpt-dtype", default="fp32", choices=["fp32", "bf16"], help="checkpoint storage")
    parser.add_argument("--skip-resume", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.checkpoints, args.steps, args.history = [1, 4], [0, 2], 4, 512
    model = models.load(args.model or models.default_model_path())
    config = EngineConfig(max_num_seqs=max(args.batches), max_num_batched_tokens=4096,
                          num_device_blocks=max(args.batches) * (max(args.checkpoints) + 2) + 8,
                          num_host_blocks=0, max_prefill_chunk=2048, ckpt_dtype=args.ckpt_dtype)
    big = EngineConfig(max_num_seqs=4, max_num_batched_tokens=4096, max_prefill_chunk=2048, num_host_blocks=0,
                       num_device_blocks=args.history // model.config.segment_size + 8)
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"model {model.num_parameters() / 1e6:.1f}M params, {model.config.memory}/{model.config.aggregation}, "
          f"segment {model.config.segment_size}, {args.ckpt_dtype} checkpoints")
    print("| batch | cached checkpoints/seq | batched tok/s | one-at-a-time tok/s | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    bench_decode(model, args.batches, args.checkpoints, args.steps, config)
    if args.skip_resume:
        return
    print("\n| time to first token | time | vs re-prefill |")
    print("|---|---:|---:|")
    bench_resume(model, args.history, 16, big)


if __name__ == "__main__":
    main()
