"""Engine configuration: one validated dataclass (pool sizes, batching limits, kernels)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .options import ConfigError, check_options, option


class EngineConfigError(ConfigError):
    pass


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = option(32, "sequences running at once (online state slots)", unit="sequences")
    max_num_batched_tokens: int = option(2048, "token budget of one step: decode tokens plus prefill chunks",
                                         unit="tokens")
    num_device_blocks: int = option(2048, "segment checkpoints the device pool holds; sets max_model_len",
                                    unit="blocks")
    num_host_blocks: int = option(2048, "checkpoint blocks in host memory, where preempted requests are "
                                  "swapped (0: preemption recomputes)", unit="blocks")
    ckpt_dtype: str = option("auto", "how checkpoints are stored (read in fp32); auto: as the weights (bf16 "
                             "weights, bf16 checkpoints: half the bytes each decode step reads)",
                             choices=("auto", "fp32", "bf16"))
    max_prefill_chunk: int = option(1024, "longest prefill chunk of one sequence in one step (cut on "
                                    "segment boundaries)", unit="tokens")
    max_prefill_while_decoding: int = option(
        0, "prefill tokens of one step while other sequences decode (0: the whole token budget); "
        "bounds how much a burst of new prompts stretches running streams' inter-token latency", unit="tokens")
    enable_prefix_reuse: bool = option(True, "share the checkpoints of a common prompt prefix between requests")
    max_waiting: int = option(256, "requests queued or running before new ones get 429", unit="requests",
                              name="max_queued_requests")
    kernels: str = option("auto", "decode and prefill on Triton kernels: auto = on CUDA",
                          choices=("auto", "triton", "torch"))
    cuda_graphs: bool = option(False, "replay the decode step from CUDA graphs (Triton kernels on CUDA)")
    decode_threads: int = option(
        1, "torch threads of the decode step on the CPU (0: all of torch's): a decode step is hundreds of "
        "small ops that one thread runs about as fast as several, and one thread is not stalled by the "
        "server's other work on a small machine; prefill keeps all threads", unit="threads")
    compile_decode: bool = option(False, "compile the decode step with torch.compile (torch kernels; "
                                  "about a minute of compiling at start, cached on disk after)")

    def for_weights(self, weights: str) -> EngineConfig:
        """This config with an "auto" checkpoint dtype resolved to the weights' ("fp32"/"bf16")."""
        return self if self.ckpt_dtype != "auto" else dataclasses.replace(self, ckpt_dtype=weights)

    def __post_init__(self) -> None:
        check_options(self, EngineConfigError,
                      may_be_zero=("num_host_blocks", "max_prefill_while_decoding", "decode_threads"))
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise EngineConfigError("max_num_batched_tokens must be >= max_num_seqs "
                                    "(every running sequence decodes one token per step)")
