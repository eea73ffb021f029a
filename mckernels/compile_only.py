"""Compile Triton launches for an NVIDIA GPU on a machine without one.

Triton compiles for a target named by its driver, then launches. `compile_only(arch)` puts in a
driver that names e.g. sm_90 (H100) and turns every `kernel[grid](...)` launch into a compile
(Triton's warm-up path): the kernels' own wrappers run on CPU tensors and each launch yields the
cubin it would have run, built by the ptxas bundled with Triton. So the GPU-only stages (TTGIR
layouts, LLVM, PTX, ptxas) run here, where the interpreter runs none of them.

Needs a process where TRITON_INTERPRET is unset (the interpreter replaces `triton.jit` at import).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime import driver
from triton.runtime.jit import KernelInterface

from mckernels import interpreted


class CompileOnlyDriver(DriverBase):
    """Names a CUDA target; can load and launch nothing, by design: its launch and timing hooks
    raise if anything tries (`compile_only` turns launches into compiles first). Its device is a
    name of its own, because Triton files each kernel's compiled versions (and the target they were
    built for) under the device: as device 0 they would be served to a later run for another arch,
    or to a real GPU."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)
        self.device = f"compile-only-sm_{arch}"

    @classmethod
    def is_active(cls):
        return False  # never picked by Triton's own driver discovery

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise RuntimeError("compile_only: kernels are compiled here, never launched")

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("compile_only: kernels are compiled here, never timed")


@dataclass
class Launch:
    """One intercepted launch: the kernel's name, its grid and what ptxas made of it."""
    name: str
    grid: object  # as launched: a tuple, or a callable of the bound arguments
    kernel: object  # triton.compiler.CompiledKernel (never loaded)


@contextlib.contextmanager
def compile_only(arch: int = 90):
    """Within the block, launches compile for sm_<arch> and are recorded instead of run."""
    if interpreted():
        raise RuntimeError("compile_only needs TRITON_INTERPRET unset: the interpreter replaced triton.jit")
    launches: list[Launch] = []
    original = KernelInterface.__getitem__

    def compile_instead(self, grid):
        def launch(*args, **kwargs):
            kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            launches.append(Launch(kernel.name, grid, kernel))
        return launch

    previous = driver._active  # None until a driver is first asked for; `driver.active` would build one
    driver.set_active(CompileOnlyDriver(arch))
    KernelInterface.__getitem__ = compile_instead
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = original
        driver._active = previous
