"""Engine benchmark (a script, not a test).

    python -m benchmarks.engine_bench          # the bundled model
    python -m benchmarks.engine_bench --quick  # small sizes, a smoke run

1. Decode throughput (generated tokens/s) of the LLMEngine at batch 1, 8, 32 with 0, 8, 32
   cached checkpoints per sequence (median of 3 runs), against running the same requests one
   at a time (each alone in the engine; tokens/s over the same work).
2. Time to first token of a request continuing a long conversation: resumed from its saved
   session (memory tier; a directory store and Redis after a restart) versus prefilling it from
   scratch.

Greedy outputs of the batched and the one-at-a-time runs are compared before any number is shown.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import shutil
import socket
import subprocess
import tempfile
import time

import torch

import models
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.params import SamplingParams
from engine.sessions import SessionStore
from engine.store.backend import KINDS, BackendError, open_backend


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


def bench_resume(model, history: int, new: int, config, redis_url: str | None) -> list[str]:
    """TTFT of the next turn of a `history`-token session: resumed from the memory tier (its
    blocks still on the device), from a directory store and from Redis after a restart (an empty
    engine: every block read from the store), and by re-prefilling the whole conversation."""
    gen = torch.Generator().manual_seed(1)
    conversation = torch.randint(0, model.config.vocab_size, (history + new,), generator=gen).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        engine = LLMEngine(model, config, SessionStore(model.fingerprint, tmp))
        ttft(engine, conversation[:history], "long")           # builds and saves the session
        stores = {"directory": tmp}
        if redis_url:
            copy_store(engine.sessions.backend, open_backend(redis_url))
            stores["Redis"] = redis_url
        times, tokens = {}, {}
        for name, where in stores.items():   # a restart: new engine, new store, nothing cached
            restarted = LLMEngine(model, config, SessionStore(model.fingerprint, where))
            times[name], tokens[name] = ttft(restarted, conversation, "long")
        times["memory"], tokens["memory"] = ttft(engine, conversation, "long")
        times["scratch"], tokens["scratch"] = ttft(LLMEngine(model, config), conversation, None)
        size = engine.sessions.info("long").nbytes
    if len(set(tokens.values())) != 1:
        raise SystemExit(f"resumed and from-scratch first tokens differ: {tokens}")
    scratch = times.pop("scratch")
    rows = [f"| re-prefill {history + new:,} tokens | {scratch * 1e3:,.0f} ms | 1x |"]
    labels = {"memory": "resume, memory tier (blocks on the device)",
              "directory": "resume from the directory (after a restart)",
              "Redis": "resume from Redis (after a restart)"}
    rows += [f"| {labels[k]} | {t * 1e3:,.0f} ms | {scratch / t:.0f}x |" for k, t in times.items()]
    print(f"# session of {history:,} tokens: {size / 2**20:.0f} MiB", flush=True)
    for row in rows:
        print(row, flush=True)
    return rows


def copy_store(src, dst) -> None:
    """Every value of one store backend into another (the same session, in Redis)."""
    for kind in KINDS:
        for key in src.list(kind):
            dst.put(kind, key, src.get(kind, key))
    dst.barrier()


@contextlib.contextmanager
def local_redis():
    """A redis-server on a free loopback port for the run (None if none is installed)."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            for _ in range(200):
                try:
                    open_backend(url).close()
                    break
                except BackendError:
                    time.sleep(0.05)
            yield url
        finally:
            proc.terminate()
            proc.wait()


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
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--redis", default="auto", help="redis://... for the Redis resume row; auto: start a "
                        "local redis-server if one is installed; none: skip the row")
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
    if not args.skip_decode:
        print("| batch | cached checkpoints/seq | batched tok/s | one-at-a-time tok/s | speed-up |")
        print("|---:|---:|---:|---:|---:|")
        bench_decode(model, args.batches, args.checkpoints, args.steps, config)
    if args.skip_resume:
        return
    print("\n| time to first token | time | vs re-prefill |")
    print("|---|---:|---:|")
    redis = local_redis() if args.redis == "auto" else contextlib.nullcontext(None if args.redis == "none" else args.redis)
    with redis as url:
        bench_resume(model, args.history, 16, big, url)


if __name__ == "__main__":
    main()
