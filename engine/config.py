"""Engine configuration: one validated dataclass (pool sizes, batching limits, sessions)."""

from __future__ import annotations

from dataclasses import dataclass


class EngineConfigError(ValueError):
    pass


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64              # online slots: sequences running at once
    max_num_batched_tokens: int = 2048  # token budget of one step (decode tokens + prefill chunks)
    num_device_blocks: int = 4096       # checkpoint blocks in the device pool
    num_host_blocks: int = 4096         # checkpoint blocks in host memory (swap)
    ckpt_dtype: str = "fp32"            # storage of checkpoints: fp32 or bf16 (read in fp32)
    max_prefill_chunk: int = 1024       # longest prefill chunk; cut on segment boundaries
    enable_prefix_reuse: bool = True
    max_waiting: int = 1024             # queued requests before add_request refuses (429 upstream)
    kernels: str = "auto"               # decode on Triton kernels: auto (on CUDA), triton, torch
    cuda_graphs: bool = False           # replay the Triton decode step from CUDA graphs (CUDA only)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "num_device_blocks", "max_prefill_chunk",
                     "max_waiting"):
            if getattr(self, name) < 1:
                raise EngineConfigError(f"engine option '{name}' must be >= 1, got {getattr(self, name)}")
        if self.num_host_blocks < 0:
            raise EngineConfigError(f"engine option 'num_host_blocks' must be >= 0, got {self.num_host_blocks}")
        if self.ckpt_dtype not in ("fp32", "bf16"):
            raise EngineConfigError(f"engine option 'ckpt_dtype' must be one of ['fp32', 'bf16'], got {self.ckpt_dtype!r}")
        if self.kernels not in ("auto", "triton", "torch"):
            raise EngineConfigError(f"engine option 'kernels' must be one of ['auto', 'triton', 'torch'], got {self.kernels!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise EngineConfigError("engine option 'max_num_batched_tokens' must be >= 'max_num_seqs' "
                                    "(every running sequence decodes one token per step)")
