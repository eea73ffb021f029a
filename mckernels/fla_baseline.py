"""flash-linear-attention's one-token recurrent kernels as a baseline for our decode step.

Our `gla` (a scalar decay per head) is fla's `simple_gla`; our `delta` (M = a (M - b k k^T M) +
b k v^T) is fla's gated delta rule. fla's `fused_recurrent` kernels read a batch of initial states
and write the final ones to a new tensor; ours update slots of the pool in place. With slots
0..B-1 both read and write each state once, so their times compare directly.

Optional: `load()` returns None when the `fla-core` package is not installed (and raises when it
is installed but cannot be imported, e.g. without its `einops`).
"""

from __future__ import annotations

import importlib.util

import torch

from mckernels import interpreted


def _first_autotune_config(configs, key, **kwargs):
    """`triton.autotune` for the interpreter, which has no device to time configurations on."""
    import triton

    def decorate(fn):
        fixed = configs[0].kwargs
        if not fixed:
            return fn
        return triton.heuristics({name: (lambda args, v=value: v) for name, value in fixed.items()})(fn)
    return decorate


def load():
    """fla's (simple_gla, gated_delta_rule) fused_recurrent functions, or None without fla."""
    import triton
    if importlib.util.find_spec("fla") is None:
        return None
    autotune = triton.autotune
    if interpreted():
        triton.autotune = _first_autotune_config  # only while fla's modules are imported
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
        from fla.ops.simple_gla import fused_recurrent_simple_gla
    finally:
        triton.autotune = autotune
    if interpreted():
        keep_first_autotune_configs()
    return fused_recurrent_simple_gla, fused_recurrent_gated_delta_rule


def keep_first_autotune_configs() -> None:
    """fla's kernels imported so far (the full flash-linear-attention package imports its ops
    and modules with `import fla`) keep one autotune config each, so that none is timed: the
    interpreter has no device to time them on."""
    import sys

    from triton.runtime.autotuner import Autotuner
    for name, module in list(sys.modules.items()):
        if name.startswith("fla.") and module is not None:
            for value in vars(module).values():
                while value is not None and not isinstance(value, Autotuner):
                    value = getattr(value, "fn", None)  # through @triton.heuristics and the like
                if value is not None and len(value.configs) > 1:
                    value.configs = value.configs[:1]


def fla_decode_step(fns, states: torch.Tensor, q, k, v, log_a, beta):
    """One token for B sequences whose states are `states` [B,H,dk,dv] fp32 (not changed).
    Returns (o [B,H,dv], new states [B,H,dk,dv]), as `decode_step_ref` with slots 0..B-1."""
    simple_gla, gated_delta = fns
    one = lambda t: t[:, None]
    if beta is None:
        o, final = simple_gla(one(q), one(k), one(v), g=one(log_a), scale=1.0, initial_state=states,
                              output_final_state=True)
    else:
        o, final = gated_delta(one(q), one(k), one(v), g=one(log_a), beta=one(beta), scale=1.0,
                               initial_state=states, output_final_state=True)
    return o[:, 0].float(), final
