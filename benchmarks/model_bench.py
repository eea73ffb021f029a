"""Throughput of the model's three execution paths (a benchmark script, not a test).

    python -m benchmarks.model_bench                        # 6 layers, d_model 256, lengths 512 2048 8192
    python -m benchmarks.model_bench --lengths 512 --quick  # a smoke run

Checks that the paths agree before timing them, then prints tokens/s for:
naive (token loop), forward (chunked, from empty), and the engine path split as
prefill of the first half (in chunks of --prefill-chunk) + one-token decode of the second half.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import models

BENCH_CONFIG = dict(vocab_size=4096, d_model=256, n_layers=6, n_heads=4, dk=64, dv=64,
                    mlp_hidden=704, memory="gla", aggregation="grm", segment_size=64, conv_size=4)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def split_run(model, toks, prefill_chunk):
    """Prefill the first half in chunks, decode the second half; returns (logits, t_prefill, t_decode)."""
    half = toks.shape[1] // 2
    state = model.new_state(toks.shape[0])
    outs = []
    t0 = time.perf_counter()
    for start in range(0, half, prefill_chunk):
        outs.append(model.prefill(toks[:, start:min(half, start + prefill_chunk)], state))
    t1 = time.perf_counter()
    outs += [model.decode(toks[:, t], state)[:, None] for t in range(half, toks.shape[1])]
    t2 = time.perf_counter()
    return torch.cat(outs, 1), t1 - t0, t2 - t1


def check_agreement(model, vocab):
    toks = torch.randint(0, vocab, (1, 200))
    ref = model.naive_forward(toks)
    err_fwd = (model(toks) - ref).abs().max().item()
    err_split = (split_run(model, toks, 64)[0] - ref).abs().max().item()
    if max(err_fwd, err_split) > 1e-3:
        raise SystemExit(f"paths disagree (forward {err_fwd:.2e}, prefill+decode {err_split:.2e}); not timing")
    return max(err_fwd, err_split)


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--memory", default=BENCH_CONFIG["memory"], choices=models.MEMORIES)
    parser.add_argument("--aggregation", default=BENCH_CONFIG["aggregation"], choices=models.AGGREGATIONS)
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--naive-max-len", type=int, default=8192, help="skip naive above this length")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--quick", action="store_true", help="1 layer, d_model 64: a smoke run")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = dict(BENCH_CONFIG, memory=args.memory, aggregation=args.aggregation)
    if args.quick:
        config.update(n_layers=1, d_model=64, dk=16, dv=16, mlp_hidden=128)
    model = models.build(config, seed=0).eval()
    err = check_agreement(model, config["vocab_size"])
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# model: {model.num_parameters() / 1e6:.1f}M params, {config}")
    print(f"# paths agree on 200 tokens: max |logit diff| {err:.1e}")
    print(f"{'length':>7} {'naive tok/s':>12} {'forward tok/s':>14} {'prefill tok/s':>14} "
          f"{'decode tok/s':>13} {'prefill+decode tok/s':>21}")
    for length in args.lengths:
        toks = torch.randint(0, config["vocab_size"], (1, length))
        model(toks[:, :256])  # warm-up
        naive = (f"{length / timed(lambda: model.naive_forward(toks)):12.0f}"
                 if length <= args.naive_max_len else f"{'skipped':>12}")
        forward = length / timed(lambda: model(toks))
        _, t_prefill, t_decode = split_run(model, toks, args.prefill_chunk)
        half = length // 2
        print(f"{length:7d} {naive} {forward:14.0f} {half / t_prefill:14.0f} "
              f"{(length - half) / t_decode:13.0f} {length / (t_prefill + t_decode):21.0f}", flush=True)


if __name__ == "__main__":
    main()
