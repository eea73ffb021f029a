"""Checkpoints saved by other libraries, served as they are.

A Hugging Face-layout directory (`config.json` with `architectures`, `model.safetensors` or a
sharded `model.safetensors.index.json`, `tokenizer.json`, `tokenizer_config.json`) loads with no
conversion step: the checkpoint stays the one file every other tool reads, and mcserve maps its
config and tensor names on load. What cannot be honoured is an error naming it, never a silent
misload.

Supported: transformers' `Mamba2ForCausalLM` (arch "mamba2").
"""

from __future__ import annotations

import math
import re
from typing import Any

from .config import ConfigError, ModelConfig

SUPPORTED = ("Mamba2ForCausalLM",)


def is_foreign(values: dict[str, Any]) -> bool:
    """Whether a config.json was written by another library (not mcserve's own)."""
    return "architectures" in values or "model_type" in values


def architecture(values: dict[str, Any]) -> str:
    archs = values.get("architectures") or []
    if values.get("model_type") == "mamba2" and not archs:
        archs = ["Mamba2ForCausalLM"]
    found = [a for a in archs if a in SUPPORTED]
    if not found:
        raise ConfigError(f"architecture {archs or values.get('model_type')!r} is not supported; "
                          f"mcserve serves {list(SUPPORTED)} and its own models")
    return found[0]


def config_from_hf(values: dict[str, Any], overrides: dict[str, Any] | None = None) -> ModelConfig:
    """mcserve's config for a foreign config.json; `overrides` sets mcserve's own keys
    (segment_size, aggregation...) on top."""
    architecture(values)
    return _mamba2_config(values, overrides or {})


def _mamba2_config(v: dict[str, Any], overrides: dict[str, Any]) -> ModelConfig:
    def need(key):
        if key not in v:
            raise ConfigError(f"Mamba2 config.json lacks {key!r}")
        return v[key]
    hidden, heads, head_dim = need("hidden_size"), need("num_heads"), need("head_dim")
    if v.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"Mamba2 hidden_act {v['hidden_act']!r} is not supported (only 'silu')")
    if int(v.get("expand", 2) * hidden) != heads * head_dim:
        raise ConfigError(f"Mamba2 expand * hidden_size ({v.get('expand', 2)} * {hidden}) must equal "
                          f"num_heads * head_dim ({heads} * {head_dim})")
    layer_types = v.get("layer_types") or []
    if any(t != "mamba" for t in layer_types):
        raise ConfigError(f"Mamba2 layer_types {sorted(set(layer_types))} are not supported (only 'mamba')")
    low, high = (_number(x) for x in v.get("time_step_limit", (0.0, math.inf)))
    values = {
        "arch": "mamba2", "memory": "gla", "aggregation": "none", "mlp": "none", "mlp_hidden": 1,
        "vocab_size": need("vocab_size"), "d_model": hidden, "n_layers": need("num_hidden_layers"),
        "n_heads": heads, "dk": need("state_size"), "dv": head_dim, "n_groups": v.get("n_groups", 1),
        "conv_size": v.get("conv_kernel", 4), "norm_eps": v.get("layer_norm_epsilon", 1e-5),
        "tie_embeddings": bool(v.get("tie_word_embeddings", False)), "proj_bias": bool(v.get("use_bias", False)),
        "conv_bias": bool(v.get("use_conv_bias", True)), "dt_min": float(low),
        "dt_max": 0.0 if math.isinf(high) else float(high), "segment_size": 64,
    }
    return ModelConfig.from_dict({**values, **overrides})


def _number(value) -> float:
    """A float of config.json: transformers 5 writes infinity as {"__float__": "Infinity"}."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{value!r} is not a number") from None


# transformers' tensor names -> mcserve's, and how to reshape them
MAMBA2_NAMES = [
    (r"backbone\.embeddings?\.weight", "embed.weight"),
    (r"backbone\.norm_f\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"backbone\.layers\.(\d+)\.norm\.weight", r"blocks.\1.mixer_norm.weight"),
    (r"backbone\.layers\.(\d+)\.mixer\.conv1d\.(weight|bias)", r"blocks.\1.mixer.conv.\2"),
    (r"backbone\.layers\.(\d+)\.mixer\.norm\.weight", r"blocks.\1.mixer.out_norm.weight"),
    (r"backbone\.layers\.(\d+)\.mixer\.out_proj\.(weight|bias)", r"blocks.\1.mixer.o_proj.\2"),
    (r"backbone\.layers\.(\d+)\.mixer\.(in_proj\.weight|in_proj\.bias|dt_bias|A_log|D)", r"blocks.\1.mixer.\2"),
]


def rename_tensors(tensors: dict, config: ModelConfig) -> dict:
    """Foreign tensor names -> mcserve's (unmapped names are kept, so the loader reports them)."""
    out = {}
    for name, tensor in tensors.items():
        for pattern, target in MAMBA2_NAMES:
            if re.fullmatch(pattern, name):
                new = re.sub(pattern, target, name)
                if new.endswith("conv.weight") and tensor.dim() == 3:
                    tensor = tensor.squeeze(1)  # Conv1d's [C, 1, W] -> ShortConv's [C, W]
                out[new] = tensor
                break
        else:
            out[name] = tensor
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)  # a tied checkpoint may carry the copy
    return out
