"""Kernel benchmark (a script, not a test) of the decode step, the cached read-out, the segment-end
copy and the chunked prefill: correctness against the torch reference first, then
time, achieved bytes/s and the ratio to the GPU's peak memory bandwidth, and the speed-up over
the torch reference and over flash-linear-attention's fused_recurrent kernels (decode step, when
`fla-core` is installed).

    python -m benchmarks.kernel_bench                  # on a GPU
    python -m benchmarks.kernel_bench --quick          # CPU smoke run (Triton interpreter: checks only)
    python -m benchmarks.kernel_bench --peak-gbs 4800  # H200 HBM3e (default 3350: H100 SXM HBM3)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import triton
import triton.testing

from mckernels import fla_baseline
from mckernels.cached_readout import cached_readout_ref
from mckernels.cached_readout.triton_kernel import cached_readout_triton
from mckernels.chunk_prefill.reference import chunk_prefill_ref, chunk_scan_terms_ref
from mckernels.chunk_prefill.terms_kernel import chunk_scan_terms_triton
from mckernels.chunk_prefill.triton_kernel import chunk_prefill_triton
from mckernels.decode_step import decode_step_ref
from mckernels.decode_step.triton_kernel import decode_step_triton
from mckernels.fla_baseline import fla_decode_step
from mckernels.segment_end.reference import segment_end_ref
from mckernels.segment_end.triton_kernel import segment_end_triton
from models.config import ModelConfig
from models.memory import build_memory


def timed(fn, repeats: int) -> float:
    """Median seconds per call. On a GPU, `triton.testing.do_bench`: CUDA events, and the L2 cache
    flushed before every call, so states and checkpoints come from HBM as they would while serving
    (an H100's 50 MB of L2 would otherwise hold a batch-16 state pool). On the CPU: wall clock."""
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_decode_step(memory, batch, H, dk, dv, device, repeats, peak, fla):
    g = torch.Generator(device="cpu").manual_seed(0)
    state = torch.randn(batch, H, dk, dv, generator=g).to(device)
    q, k = (torch.nn.functional.normalize(torch.randn(batch, H, dk, generator=g), dim=-1).to(device) for _ in range(2))
    v = torch.randn(batch, H, dv, generator=g).to(device)
    log_a = (-torch.rand(batch, H, generator=g) * 0.1).to(device)
    beta = torch.rand(batch, H, generator=g).to(device) if memory == "delta" else None
    slots = torch.arange(batch, device=device)
    ref_state, got_state = state.clone(), state.clone()
    ref = decode_step_ref(ref_state, slots, q, k, v, log_a, beta)
    got = decode_step_triton(got_state, slots, q, k, v, log_a, beta)
    if not (torch.allclose(ref, got, atol=1e-4) and torch.allclose(ref_state, got_state, atol=1e-4)):
        raise SystemExit(f"decode_step {memory}: kernel and reference disagree; not timing")
    if fla is not None:
        fla_out, fla_state = fla_decode_step(fla, state, q, k, v, log_a, beta)
        if not (torch.allclose(ref, fla_out, atol=1e-4) and torch.allclose(ref_state, fla_state, atol=1e-4)):
            raise SystemExit(f"decode_step {memory}: fla's fused_recurrent disagrees with the reference; not timing")
    # Timing goes on updating the states in place; the checks above are done.
    t_kernel = timed(lambda: decode_step_triton(got_state, slots, q, k, v, log_a, beta), repeats)
    t_ref = timed(lambda: decode_step_ref(ref_state, slots, q, k, v, log_a, beta), repeats)
    t_fla = timed(lambda: fla_decode_step(fla, state, q, k, v, log_a, beta), repeats) if fla else None
    moved = 2 * state.numel() * 4  # read and write every state once
    return report(f"decode_step {memory}", f"B={batch}", moved, t_kernel, t_ref, peak, t_fla)


def bench_cached_readout(batch, n_ckpt, H, dk, dv, mode, storage, device, repeats, peak):
    g = torch.Generator(device="cpu").manual_seed(1)
    N = batch * n_ckpt
    pool = torch.randn(N, H, dk, dv, generator=g).to(storage).to(device)
    summaries = torch.randn(N, H, dk, generator=g).to(device)
    tables = torch.randperm(N, generator=g).view(batch, n_ckpt).to(torch.int32).to(device)
    lengths = torch.full((batch,), n_ckpt, device=device)
    q = torch.nn.functional.normalize(torch.randn(batch, H, dk, generator=g), dim=-1).to(device)
    u = torch.randn(batch, H, dk, generator=g).to(device)
    r_on = torch.randn(batch, H, generator=g).to(device)
    args = (pool, summaries, tables, lengths, q, u, r_on)
    ref = cached_readout_ref(*args, mode=mode, top_k=2, scale=dk ** -0.5)
    got = cached_readout_triton(*args, mode=mode, top_k=2, scale=dk ** -0.5)
    if not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(ref, got)):
        raise SystemExit(f"cached_readout {mode}: kernel and reference disagree; not timing")
    t_kernel = timed(lambda: cached_readout_triton(*args, mode=mode, top_k=2, scale=dk ** -0.5), repeats)
    t_ref = timed(lambda: cached_readout_ref(*args, mode=mode, top_k=2, scale=dk ** -0.5), max(1, repeats // 4))
    read = min(n_ckpt, 2 if mode == "ssc" else n_ckpt)
    moved = batch * read * H * dk * dv * pool.element_size()
    return report(f"cached_readout {mode} {str(storage)[6:]}", f"B={batch} n={n_ckpt}", moved, t_kernel, t_ref, peak)


def bench_segment_end(batch, H, dk, dv, storage, device, repeats, peak):
    """Every row ends its segment (the worst step): copy its state into a block, then reset it."""
    g = torch.Generator(device="cpu").manual_seed(2)
    online = torch.randn(batch, H, dk, dv, generator=g).to(device)
    slots = torch.arange(batch, device=device)
    ends = torch.randperm(2 * batch, generator=g)[:batch].to(device)
    pools = [torch.zeros(2 * batch, H, dk, dv, dtype=storage, device=device) for _ in range(2)]
    states = [online.clone(), online.clone()]
    segment_end_ref(states[0], slots, ends, pools[0], True)
    segment_end_triton(states[1], slots, ends, pools[1], True)
    if not (torch.equal(pools[0], pools[1]) and torch.equal(states[0], states[1])):
        raise SystemExit("segment_end: kernel and reference disagree; not timing")
    t_kernel = timed(lambda: segment_end_triton(online, slots, ends, pools[1], True), repeats)
    t_ref = timed(lambda: segment_end_ref(online, slots, ends, pools[0], True), repeats)
    moved = online.numel() * (4 + pools[0].element_size() + 4)  # read the state, write the block and zeros
    return report(f"segment_end {str(storage)[6:]}", f"B={batch}", moved, t_kernel, t_ref, peak)


def bench_chunk_prefill(memory, T, H, dk, dv, chunk, device, repeats, peak):
    """One sequence of T tokens: gla straight from q, k, v; delta from its chunk terms (after the
    triangular solve, which stays in torch and is not timed here)."""
    g = torch.Generator(device="cpu").manual_seed(3)
    q, k = (torch.nn.functional.normalize(torch.randn(T, H, dk, generator=g), dim=-1).to(device) for _ in range(2))
    v = torch.randn(T, H, dv, generator=g).to(device)
    log_a = (-torch.rand(T, H, generator=g) * 0.05).to(device)
    M0 = torch.zeros(H, dk, dv, device=device)
    if memory == "gla":
        args = (q, k, v, log_a, M0, chunk)
        kernel, reference = chunk_prefill_triton, chunk_prefill_ref
        inputs = [q, k, v]
    else:
        N = T // chunk
        heads = lambda t: t.permute(1, 0, 2).reshape(1, H, N, chunk, -1)
        beta = torch.rand(1, H, N, chunk, generator=g).to(device)
        terms = build_memory(ModelConfig(memory="delta", n_heads=H, dk=dk, dv=dv, d_model=H * dk)).chunk_terms(
            heads(q), heads(k), heads(v), log_a.T.reshape(1, H, N, chunk), beta)
        args = tuple(t.flatten(0, 1) for t in (terms.q_decayed, terms.attn, terms.values, terms.w,
                                                terms.k_to_end, terms.gamma_end)) + (M0,)
        kernel, reference = chunk_scan_terms_triton, chunk_scan_terms_ref
        inputs = list(args[:5])
    want, got = reference(*args), kernel(*args)
    if not all(torch.allclose(a, b, atol=1e-3, rtol=1e-3) for a, b in zip(want, got)):
        raise SystemExit(f"chunk prefill {memory}: kernel and reference disagree; not timing")
    t_kernel = timed(lambda: kernel(*args), repeats)
    t_ref = timed(lambda: reference(*args), max(1, repeats // 4))
    moved = sum(t.numel() * t.element_size() for t in [*inputs, *got])  # read the inputs, write out + states
    return report(f"chunk prefill {memory}", f"T={T} chunk={chunk}", moved, t_kernel, t_ref, peak)


def report(name, shape, moved, t_kernel, t_ref, peak, t_fla=None) -> str:
    gbs = moved / t_kernel / 1e9
    vs_fla = f"{t_fla / t_kernel:.2f}x" if t_fla is not None else "-"
    line = (f"| {name} | {shape} | {t_kernel * 1e6:,.1f} us | {gbs:,.0f} GB/s | {100 * gbs / peak:.0f}% | "
            f"{t_ref / t_kernel:.1f}x | {vs_fla} |")
    print(line, flush=True)
    return line


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peak-gbs", type=float, default=3350.0, help="the GPU's peak memory bandwidth, GB/s")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU interpreter smoke run)")
    parser.add_argument("--no-fla", action="store_true", help="skip flash-linear-attention's kernels")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick or device == "cpu":
        batches, ckpts, H, dk, dv, repeats, tokens, chunk = [2], [3], 2, 16, 16, 2, [32], 16
    else:
        batches, ckpts, H, dk, dv, repeats, tokens, chunk = [1, 16, 64, 256], [8, 32], 16, 64, 64, 20, [1024, 8192], 64
    print(f"# {torch.cuda.get_device_name() if device == 'cuda' else 'CPU, Triton interpreter (checks only)'}")
    fla = None if args.no_fla else fla_baseline.load()
    baseline = (f"fla-core {importlib.metadata.version('fla-core')}" if fla else
                "fla skipped" if args.no_fla else "fla-core not installed")
    print(f"# {baseline}; vs fla = fla's fused_recurrent time / ours (above 1: ours is faster)")
    print("| kernel | shape | time | bytes/s | of peak | vs torch | vs fla |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for memory in ("gla", "delta"):
        for b in batches:
            bench_decode_step(memory, b, H, dk, dv, device, repeats, args.peak_gbs, fla)
    for b in batches:
        for n in ckpts:
            for mode in ("grm", "ssc"):
                for storage in (torch.float32, torch.bfloat16):
                    bench_cached_readout(b, n, H, dk, dv, mode, storage, device, repeats, args.peak_gbs)
    for b in batches:
        for storage in (torch.float32, torch.bfloat16):
            bench_segment_end(b, H, dk, dv, storage, device, repeats, args.peak_gbs)
    for memory in ("gla", "delta"):
        for T in tokens:
            bench_chunk_prefill(memory, T, H, dk, dv, chunk, device, repeats, args.peak_gbs)


if __name__ == "__main__":
    main()
