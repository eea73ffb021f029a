"""Compile every Triton kernel the engine launches for an NVIDIA GPU, here, without one, and report
what ptxas made of each: registers, spills, shared memory, the widest global load and the
theoretical occupancy. A kernel that spills or stops vectorising its loads shows up here first.

    python -m mckernels.compile_check                          # sm_90 (H100/H200), 16 heads, dk = dv = 64
    python -m mckernels.compile_check --arch 80 --heads 4      # A100, the bundled model's heads
    python -m mckernels.compile_check --fail-on-spill          # exit 1 if any kernel spills

The kernels run through their own wrappers on CPU tensors, so each launch compiles with the very
arguments (constexprs, dtypes, alignment) the engine would pass. Run it with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import triton

from mckernels import interpreted
from mckernels.compile_only import compile_only


@dataclass(frozen=True)
class SMLimits:
    """One SM's limits, as the CUDA occupancy calculator has them."""
    max_warps: int
    max_blocks: int
    registers: int
    shared: int            # bytes per SM
    shared_per_block: int  # the most one block may opt in to; a kernel needing more cannot launch


SM_LIMITS = {80: SMLimits(64, 32, 65536, 167936, 166912), 86: SMLimits(48, 16, 65536, 102400, 101376),
             89: SMLimits(48, 24, 65536, 102400, 101376), 90: SMLimits(64, 32, 65536, 233472, 232448)}
REG_UNIT = 256            # registers are given to a warp in units of 256
SHARED_RESERVED = 1024    # the driver keeps 1 KiB of shared memory per block
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@dataclass
class Built:
    """What ptxas made of one kernel specialisation."""
    label: str
    name: str
    warps: int
    regs: int
    stack_bytes: int      # per-thread stack frame: where ptxas spills registers (local memory)
    shared: int
    widest_load: int      # bits of the widest global load in the SASS (128 = LDG.E.128)
    occupancy: float      # resident warps / the SM's maximum, from regs, shared memory and warps


def resource_usage(cubin: bytes) -> tuple[dict[str, int], str]:
    """cuobjdump's REG/STACK/SHARED/LOCAL counts and the SASS of one cubin. Spilled registers
    show in STACK (the stack frame), not in LOCAL."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    counts = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return counts, sass


def widest_global_load(sass: str) -> int:
    widths = [int(w) if w else 32 for w in re.findall(r"\bLDG\.E(?:\.(?:EL|LU|EF|CONSTANT|STRONG\.\w+))*"
                                                       r"(?:\.U?(\d+))?\b", sass)]
    return max(widths, default=0)


def occupancy(arch: int, warps: int, regs: int, shared: int) -> float:
    sm = SM_LIMITS[arch]
    regs_per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    blocks = min(sm.max_blocks, sm.max_warps // warps, sm.registers // max(1, regs_per_warp * warps),
                 sm.shared // (shared + SHARED_RESERVED))
    return blocks * warps / sm.max_warps


def workloads(H: int, dk: int, dv: int, chunk: int):
    """(label, thunk) pairs: each thunk calls one kernel wrapper as the engine does."""
    from mckernels.cached_readout.triton_kernel import cached_readout_triton
    from mckernels.chunk_prefill.terms_kernel import chunk_scan_terms_triton
    from mckernels.chunk_prefill.triton_kernel import chunk_prefill_triton
    from mckernels.decode_step.triton_kernel import decode_step_triton
    from mckernels.segment_end.triton_kernel import segment_end_triton

    B, n, T = 8, 32, 4 * chunk
    slots = torch.arange(B)
    q, k = torch.randn(B, H, dk), torch.randn(B, H, dk)
    v, zeros, ones = torch.randn(B, H, dv), torch.zeros(B, H), torch.ones(B, H)
    online = torch.zeros(B, H, dk, dv)

    def pool(dtype):
        return torch.zeros(B * n, H, dk, dv, dtype=dtype), torch.zeros(B * n, H, dk)

    def readout(mode, dtype):
        tables = torch.arange(B * n, dtype=torch.int32).view(B, n)
        return lambda: cached_readout_triton(*pool(dtype), tables, torch.full((B,), n), q, q, zeros, mode, 2, 0.125)

    jobs = [(f"decode_step {kind}", lambda beta=beta: decode_step_triton(online, slots, q, k, v, zeros, beta))
            for kind, beta in (("gla", None), ("delta", ones))]
    storage = {"fp32": torch.float32, "bf16": torch.bfloat16}
    jobs += [(f"cached_readout {mode} {name}", readout(mode, dtype))
             for mode in ("residual", "grm", "ssc") for name, dtype in storage.items()]
    jobs += [(f"segment_end {name}", lambda dtype=dtype: segment_end_triton(online, slots, slots, pool(dtype)[0], True))
             for name, dtype in storage.items()]
    jobs.append((f"chunk_prefill gla, chunk {chunk}", lambda: chunk_prefill_triton(
        torch.randn(T, H, dk), torch.randn(T, H, dk), torch.randn(T, H, dv), torch.zeros(T, H),
        torch.zeros(H, dk, dv), chunk)))
    BH, N = 2 * H, T // chunk
    terms = (torch.randn(BH, N, chunk, dk), torch.randn(BH, N, chunk, chunk), torch.randn(BH, N, chunk, dv))
    for label, w in (("delta", torch.randn(BH, N, chunk, dk)), ("gla", None)):
        jobs.append((f"chunk_scan_terms {label}, chunk {chunk}", lambda w=w: chunk_scan_terms_triton(
            *terms, w, torch.randn(BH, N, chunk, dk), torch.rand(BH, N), torch.zeros(BH, dk, dv))))
    return jobs


def build_all(arch: int, H: int, dk: int, dv: int, chunk: int) -> list[Built]:
    built = []
    with compile_only(arch) as launches:
        for label, call in workloads(H, dk, dv, chunk):
            launches.clear()
            call()
            for launch in launches:
                counts, sass = resource_usage(launch.kernel.asm["cubin"])
                warps, shared = launch.kernel.metadata.num_warps, launch.kernel.metadata.shared
                built.append(Built(label, launch.name, warps, counts["REG"], counts["STACK"], shared,
                                   widest_global_load(sass), occupancy(arch, warps, counts["REG"], shared)))
    return built


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SM_LIMITS), help="compute capability x10")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dk", type=int, default=64)
    parser.add_argument("--dv", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64, help="prefill chunk length")
    parser.add_argument("--fail-on-spill", action="store_true", help="exit 1 if any kernel spills registers")
    args = parser.parse_args(argv)
    if min(args.heads, args.dk, args.dv, args.chunk) < 1:
        parser.error("--heads, --dk, --dv and --chunk must be positive")
    if interpreted():
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    print(f"# sm_{args.arch}, triton {triton.__version__}; heads {args.heads}, dk {args.dk}, dv {args.dv}, "
          f"chunk {args.chunk}")
    print("| kernel | warps | registers | stack (spill) bytes | shared bytes | widest load | occupancy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    built = build_all(args.arch, args.heads, args.dk, args.dv, args.chunk)
    for b in built:
        print(f"| {b.label} | {b.warps} | {b.regs} | {b.stack_bytes} | {b.shared:,} | {b.widest_load}-bit | "
              f"{100 * b.occupancy:.0f}% |")
    too_big = [b.label for b in built if b.shared > SM_LIMITS[args.arch].shared_per_block]
    spilled = [b.label for b in built if b.stack_bytes]
    if too_big:
        print(f"cannot launch on sm_{args.arch}, too much shared memory: {', '.join(too_big)}", file=sys.stderr)
    if spilled:
        print(f"spills in: {', '.join(spilled)}", file=sys.stderr)
    return 1 if too_big or (spilled and args.fail_on_spill) else 0


if __name__ == "__main__":
    sys.exit(main())
