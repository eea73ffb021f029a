"""Every Triton kernel compiles for real NVIDIA targets (ptxas included), without a GPU, and fits.

The interpreter runs none of Triton's GPU stages, so a kernel can pass every interpreter test and
still fail on a GPU: too much shared memory, register spills, a layout the compiler rejects. These
tests compile each kernel as the engine launches it, in a subprocess without TRITON_INTERPRET.
"""

import ast
import os
import subprocess
import sys

import pytest

from mckernels.compile_check import SM_LIMITS, SMLimits, occupancy, widest_global_load

KERNELS = ["decode_step gla", "decode_step delta", "cached_readout residual fp32", "cached_readout grm bf16",
           "cached_readout ssc fp32", "cached_readout ssc bf16", "segment_end fp32", "segment_end bf16",
           "chunk_prefill gla", "chunk_scan_terms delta", "chunk_scan_terms gla"]


def run_compile_check(*argv: str, code: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", code, *argv] if code else [sys.executable, "-m", "mckernels.compile_check", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def rows(stdout: str) -> dict[str, list[str]]:
    """The report's table: kernel label -> its cells."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ") and "warps" not in line]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


@pytest.mark.parametrize("argv", [
    ("--arch", "90"),                                                                 # the e2e benchmark's shape
    ("--arch", "80", "--heads", "3", "--dk", "24", "--dv", "40", "--chunk", "16"),   # odd sizes, Ampere
    ("--arch", "90", "--heads", "24", "--dk", "128", "--dv", "64"),                   # mamba2-130m's layers
    ("--arch", "90", "--heads", "6", "--dk", "256", "--dv", "512"),                   # GDN 1.3B's layers
])
def test_every_kernel_compiles_for_the_gpu_and_fits(argv):
    done = run_compile_check(*argv)
    assert done.returncode == 0, done.stderr
    table = rows(done.stdout)
    for name in KERNELS:
        assert any(label.startswith(name) for label in table), f"{name} missing:\n{done.stdout}"
    for label, (_, regs, stack, _, widest, _) in table.items():
        assert widest.endswith("-bit") and int(regs) > 0, label
        if not label.startswith("chunk_"):  # the decode path must never spill (prefill's tf32x3 tiles do)
            assert stack == "0", (label, stack)


def test_a_kernel_over_the_shared_memory_limit_is_refused():
    """Triton's default of three pipeline stages: at dk = dv = 128 the delta scan needs 256 KiB
    (an H100 gives a block 227 KiB)."""
    code = ("import sys; from mckernels.chunk_prefill import triton_kernel as tk; "
            "tk.LAUNCH.update(num_stages=3); from mckernels.compile_check import main; "
            "sys.exit(main(sys.argv[1:]))")
    done = run_compile_check("--arch", "90", "--dk", "128", "--dv", "128", code=code)
    assert done.returncode == 1
    assert "cannot launch on sm_90, too much shared memory: chunk_scan_terms delta" in done.stderr


def test_spills_fail_the_check_when_asked():
    done = run_compile_check("--arch", "90", "--fail-on-spill")
    assert done.returncode == 1 and "spills in: chunk_prefill gla" in done.stderr


def test_interpreter_mode_is_a_clear_error():
    done = subprocess.run([sys.executable, "-m", "mckernels.compile_check"], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=120)
    assert done.returncode == 2 and "unset TRITON_INTERPRET" in done.stderr


def test_widest_load_reads_the_sass():
    sass = "LDG.E R4, desc[UR4][R2.64] ;\nLDG.E.128.CONSTANT R8, desc[UR4][R6.64] ;\nLDG.E.U16 R1, [R2] ;"
    assert widest_global_load(sass) == 128
    assert widest_global_load("LDG.E.64 R4, [R2.64] ;\nLDG.E R5, [R3] ;") == 64
    assert widest_global_load("STG.E [R2], R4 ;") == 0


def test_occupancy_takes_the_tightest_limit(monkeypatch):
    monkeypatch.setitem(SM_LIMITS, 999, SMLimits(max_warps=64, max_blocks=32, registers=65536, shared=233472,
                                                  shared_per_block=232448))
    assert occupancy(999, warps=4, regs=32, shared=0) == 1.0            # 16 blocks x 4 warps
    assert occupancy(999, warps=4, regs=95, shared=1024) == 20 / 64     # 96 regs: 5 blocks
    assert occupancy(999, warps=4, regs=32, shared=100_000) == 8 / 64   # 2 blocks by shared memory


COUNT_COMPILES = """
import torch
from mckernels.compile_only import compile_only
from mckernels.chunk_prefill.terms_kernel import chunk_scan_terms_triton
from mckernels.chunk_prefill.triton_kernel import chunk_prefill_triton
H, dk, dv, L, BH = 2, 16, 16, 16, 2
with compile_only(90) as launches:
    for N in (1, 2, 3, 5, 16, 17):
        T = N * L
        chunk_prefill_triton(torch.randn(T, H, dk), torch.randn(T, H, dk), torch.randn(T, H, dv), torch.zeros(T, H),
                             torch.zeros(H, dk, dv), L)
        chunk_scan_terms_triton(torch.randn(BH, N, L, dk), torch.randn(BH, N, L, L), torch.randn(BH, N, L, dv), None,
                                torch.randn(BH, N, L, dk), torch.rand(BH, N), torch.zeros(BH, dk, dv))
print(sorted({(launch.name, id(launch.kernel)) for launch in launches}))
"""


def test_one_compiled_prefill_kernel_serves_every_prompt_length():
    """Each compile costs about a second of host CPU (1.1 s here): a prefill kernel specialised on the prompt's
    length (it once took T as a constexpr) would compile again for every new length."""
    done = run_compile_check(code=COUNT_COMPILES)
    assert done.returncode == 0, done.stderr
    names = [name for name, _ in ast.literal_eval(done.stdout)]
    assert sorted(names) == ["_chunk_prefill_kernel", "_terms_scan_kernel"], names


TWO_ARCHS = """
import torch
from triton.runtime import driver
from mckernels.compile_only import compile_only
from mckernels.decode_step.triton_kernel import decode_step_triton
state, q, v, a = torch.zeros(2, 1, 16, 16), torch.randn(2, 1, 16), torch.randn(2, 1, 16), torch.zeros(2, 1)
targets = []
for arch in (80, 90):
    with compile_only(arch) as launches:
        decode_step_triton(state, torch.arange(2), q, q, v, a, None)
    targets.append(launches[0].kernel.metadata.target.arch)
print(targets, driver._active)
"""


def test_compile_only_builds_for_each_arch_and_restores_the_driver():
    """Triton files compiled kernels under the device: each arch is a device of its own, or the
    second block would be served the first one's cubins."""
    done = run_compile_check(code=TWO_ARCHS)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[80, 90] None"
