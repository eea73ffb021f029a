"""End-to-end decode benchmark on the kernels (a script, not a test): generated tokens/s of the
LLMEngine for a large random model, Triton path against the torch path.

    python -m benchmarks.kernel_e2e_bench          # on a GPU: 24 layers, d_model 1024, 16 heads
    python -m benchmarks.kernel_e2e_bench --quick  # CPU smoke run (Triton interpreter: checks only)

For each aggregation (grm, ssc top-2), batch (1, 16, 64, 256) and number of cached checkpoints per
sequence (0, 8, 32): prefill the batch (untimed), then time decode steps. Before any timing the
greedy tokens of the two paths are compared on a short run; a mismatch stops the script.
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import models
from benchmarks.engine_bench import decode_rate
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.params import SamplingParams

LARGE = dict(n_layers=24, d_model=1024, n_heads=16, dk=64, dv=64, mlp_hidden=2816, vocab_size=50257,
             segment_size=64, memory="gla")
SMALL = dict(n_layers=2, d_model=32, n_heads=2, dk=8, dv=8, mlp_hidden=64, vocab_size=97, segment_size=16,
             memory="gla")


def engine_config(batch: int, n_ckpt: int, kernels: str, ckpt_dtype: str) -> EngineConfig:
    return EngineConfig(max_num_seqs=batch, max_num_batched_tokens=8192, max_prefill_chunk=4096,
                        num_device_blocks=batch * (n_ckpt + 2) + 8, num_host_blocks=0, kernels=kernels,
                        ckpt_dtype=ckpt_dtype)


def check_paths_agree(model, n_ckpt: int) -> None:
    """Greedy tokens of both paths with fp32 checkpoints (with bf16 the torch path also rounds its
    gate weights to bf16, so near-ties could part for that reason alone)."""
    S, V = model.config.segment_size, model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V, (n_ckpt * S + 1 + i,), generator=gen).tolist() for i in range(2)]
    params = SamplingParams(max_tokens=S + 2, temperature=0.0)  # crosses a segment end
    outs = [LLMEngine(model, engine_config(2, n_ckpt + 2, k, "fp32")).generate(prompts, params)
            for k in ("torch", "triton")]
    if outs[0] != outs[1]:
        raise SystemExit(f"triton and torch greedy outputs differ ({n_ckpt} checkpoints); not timing")


def run(model, batches, ckpt_counts, steps, ckpt_dtype) -> None:
    S, V = model.config.segment_size, model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    for n_ckpt in ckpt_counts:
        check_paths_agree(model, n_ckpt)
        for batch in batches:
            prompts = [torch.randint(0, V, (n_ckpt * S + 1,), generator=gen).tolist() for _ in range(batch)]
            rates = {}
            for kernels in ("triton", "torch"):
                engine = LLMEngine(model, engine_config(batch, n_ckpt, kernels, ckpt_dtype))
                decode_rate(engine, prompts[:1], 2)  # warm-up: compiles the kernels for this shape
                rates[kernels], _ = decode_rate(engine, prompts, steps)
            c = model.config
            name = c.aggregation + (f" top-{c.ssc_top_k}" if c.aggregation == "ssc" else "")
            print(f"| {name} | {batch} | {n_ckpt} | {rates['triton']:,.0f} | {rates['torch']:,.0f} | "
                  f"{rates['triton'] / rates['torch']:.1f}x |", flush=True)


@torch.inference_mode()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[0, 8, 32])
    parser.add_argument("--aggregations", nargs="+", default=["grm", "ssc"])
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    parser.add_argument("--ckpt-dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes (CPU smoke run)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = LARGE
    if args.quick or device == "cpu":
        shape, args.batches, args.checkpoints, args.steps = SMALL, [1, 3], [0, 2], 3
    print(f"# {torch.cuda.get_device_name() if device == 'cuda' else 'CPU, Triton interpreter (checks only)'}; "
          f"{shape['n_layers']} layers, d_model {shape['d_model']}, {shape['n_heads']} heads, "
          f"{args.ckpt_dtype} checkpoints")
    print("| aggregation | batch | checkpoints/seq | triton tok/s | torch tok/s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for aggregation in args.aggregations:
        model = models.build({**shape, "aggregation": aggregation, "ssc_top_k": 2}, seed=0).to(device).eval()
        run(model, args.batches, args.checkpoints, args.steps, args.ckpt_dtype)
        del model


if __name__ == "__main__":
    main()
