"""How far the chunked prefill drifts from fp64 when its products run in TF32 or tf32x3, emulated on
the CPU (why `DOT_PRECISION` in mckernels/chunk_prefill is tf32x3; the interpreter computes in fp32).

    python -m benchmarks.tf32_emulation  # 4096 tokens, 4 heads, dk = dv = chunk = 64

TF32 keeps 10 of fp32's 23 mantissa bits; tensor cores multiply the rounded operands exactly and
accumulate in fp32. tf32x3 splits each operand into a TF32 head and a TF32 tail and adds the three
products that matter (head*head + head*tail + tail*head), as Triton does for `input_precision="tf32x3"`.
"""

from __future__ import annotations

import argparse

import torch

from mckernels.chunk_prefill.reference import chunk_prefill_ref


def to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest TF32 value (ties away from zero, as cvt.rna.tf32.f32), still fp32."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def matmul_tf32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return to_tf32(a) @ to_tf32(b)


def matmul_tf32x3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a_head, b_head = to_tf32(a), to_tf32(b)
    a_tail, b_tail = to_tf32(a - a_head), to_tf32(b - b_head)
    return a_head @ b_tail + a_tail @ b_head + a_head @ b_head


def drift(T: int, H: int, dk: int, dv: int, chunk: int, decay: float, seed: int = 0) -> dict[str, tuple]:
    """precision -> (max |o - o_fp64|, max |state - state_fp64|) over a prefill of T tokens."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.nn.functional.normalize(torch.randn(T, H, dk, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(T, H, dv, generator=g)
    log_a = torch.full((T, H), decay).log()
    M0 = torch.zeros(H, dk, dv)
    exact_o, _, exact_M = chunk_prefill_ref(q, k, v, log_a, M0, chunk, dtype=torch.float64)
    errors = {}
    for name, matmul in (("fp32", torch.matmul), ("tf32", matmul_tf32), ("tf32x3", matmul_tf32x3)):
        o, _, M = chunk_prefill_ref(q, k, v, log_a, M0, chunk, matmul=matmul)
        errors[name] = ((o.double() - exact_o).abs().max().item(), (M.double() - exact_M).abs().max().item())
    return errors


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dk", type=int, default=64)
    parser.add_argument("--dv", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--decay", type=float, default=0.995, help="per-token state decay (gla's a)")
    args = parser.parse_args(argv)
    if args.tokens % args.chunk or min(args.tokens, args.heads, args.dk, args.dv, args.chunk) < 1:
        parser.error("sizes must be positive and --tokens a multiple of --chunk")
    if not 0 < args.decay <= 1:
        parser.error("--decay must be in (0, 1]")
    print(f"# {args.tokens} tokens, {args.heads} heads, dk {args.dk}, dv {args.dv}, chunk {args.chunk}, "
          f"decay {args.decay}; unit-norm q, k; v ~ N(0, 1)")
    print("| products | max abs error of outputs | max abs error of the final state |")
    print("|---|---:|---:|")
    for name, (out_err, state_err) in drift(args.tokens, args.heads, args.dk, args.dv, args.chunk,
                                            args.decay).items():
        print(f"| {name} | {out_err:.1e} | {state_err:.1e} |")


if __name__ == "__main__":
    main()
