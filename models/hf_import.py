"""Checkpoints saved by other libraries, served as they are.

A Hugging Face-layout directory (`config.json` with `architectures`, `model.safetensors` or a
sharded `model.safetensors.index.json`, `tokenizer.json`, `tokenizer_config.json`) loads with no
conversion step: the checkpoint stays the one file every other tool reads, and mcserve maps its
config and tensor names on load. What cannot be honoured is an error naming it, never a silent
misload.

Supported: transformers' `Mamba2ForCausalLM` (arch "mamba2") and flash-linear-attention's
`GatedDeltaNetForCausalLM` (arch "gated_deltanet").
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from .config import ConfigError, ModelConfig

MODEL_TYPES = {"mamba2": "Mamba2ForCausalLM", "gated_deltanet": "GatedDeltaNetForCausalLM"}
SUPPORTED = tuple(MODEL_TYPES.values())


def is_foreign(values: dict[str, Any]) -> bool:
    """Whether a config.json was written by another library (not mcserve's own)."""
    return "architectures" in values or "model_type" in values or "ssm_cfg" in values


def architecture(values: dict[str, Any]) -> str:
    if "ssm_cfg" in values and not values.get("architectures"):
        raise ConfigError("this is a mamba_ssm checkpoint (config.json with ssm_cfg), not transformers' layout: "
                          "convert it once with transformers' mamba2 conversion script, then load the result")
    archs = values.get("architectures") or []
    if not archs and values.get("model_type") in MODEL_TYPES:
        archs = [MODEL_TYPES[values["model_type"]]]
    found = [a for a in archs if a in SUPPORTED]
    if not found:
        raise ConfigError(f"architecture {archs or values.get('model_type')!r} is not supported; "
                          f"mcserve serves {list(SUPPORTED)} and its own models")
    return found[0]


def config_from_hf(values: dict[str, Any], overrides: dict[str, Any] | None = None) -> ModelConfig:
    """mcserve's config for a foreign config.json; `overrides` sets mcserve's own keys
    (segment_size, aggregation...) on top."""
    if architecture(values) == "GatedDeltaNetForCausalLM":
        return _gated_deltanet_config(values, overrides or {})
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
        "n_heads": heads, "dk": need("state_size"), "dv": head_dim, "n_groups": v.get("n_groups", 8),
        "conv_size": v.get("conv_kernel", 4), "norm_eps": v.get("layer_norm_epsilon", 1e-5),
        "tie_embeddings": bool(v.get("tie_word_embeddings", False)), "proj_bias": bool(v.get("use_bias", False)),
        "conv_bias": bool(v.get("use_conv_bias", True)), "dt_min": float(low),
        "dt_max": 0.0 if math.isinf(high) else float(high), "segment_size": 64,
    }
    return ModelConfig.from_dict({**values, **overrides})


def _gated_deltanet_config(v: dict[str, Any], overrides: dict[str, Any]) -> ModelConfig:
    for key, want in (("use_gate", True), ("use_short_conv", True), ("hidden_act", "swish"),
                      ("attnres_block_size", None)):
        if v.get(key, want) != want:
            raise ConfigError(f"GatedDeltaNet {key}={v[key]!r} is not supported (only {want!r})")
    if v.get("attn"):
        raise ConfigError("GatedDeltaNet with attention layers (config 'attn', a hybrid model) is not supported")
    hidden, heads, head_dim = v.get("hidden_size", 2048), v.get("num_heads", 6), v.get("head_dim", 256)
    v_heads, expand_v = v.get("num_v_heads") or heads, float(v.get("expand_v", 2.0))
    if head_dim * expand_v != int(head_dim * expand_v) or v_heads % heads:
        raise ConfigError(f"GatedDeltaNet head_dim * expand_v ({head_dim} * {expand_v}) must be whole and "
                          f"num_v_heads ({v_heads}) a multiple of num_heads ({heads})")
    intermediate = v.get("intermediate_size")
    if intermediate is None:  # fla's GatedMLP: 2/3 of hidden_ratio * hidden, up to a multiple of 256
        intermediate = int(hidden * (v.get("hidden_ratio") or 4) * 2 / 3)
        intermediate = 256 * ((intermediate + 255) // 256)
    activation = v.get("output_gate_activation", "swish")
    values = {
        "arch": "gated_deltanet", "memory": "delta", "aggregation": "none", "mlp": "swiglu",
        "vocab_size": v.get("vocab_size", 32000), "d_model": hidden, "n_layers": v.get("num_hidden_layers", 21),
        "n_heads": v_heads, "n_groups": heads, "dk": head_dim, "dv": int(head_dim * expand_v),
        "mlp_hidden": intermediate, "conv_size": v.get("conv_size", 4), "norm_eps": v.get("norm_eps", 1e-6),
        "tie_embeddings": bool(v.get("tie_word_embeddings", False)),
        "gate_activation": "swish" if activation == "silu" else activation,
        "neg_eigval": bool(v.get("allow_neg_eigval", False)), "segment_size": 64,
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


GDN_NAMES = [
    (r"model\.embeddings\.weight", "embed.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"model\.layers\.(\d+)\.attn_norm\.weight", r"blocks.\1.mixer_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp_norm\.weight", r"blocks.\1.mlp_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"blocks.\1.mlp.down.weight"),
    (r"model\.layers\.(\d+)\.attn\.(A_log|dt_bias)", r"blocks.\1.mixer.\2"),
    (r"model\.layers\.(\d+)\.attn\.o_proj\.weight", r"blocks.\1.mixer.o_proj.weight"),
    (r"model\.layers\.(\d+)\.attn\.o_norm\.weight", r"blocks.\1.mixer.head_norm_weight"),
]
# Several of fla's tensors make one of mcserve's, concatenated in this order along dim 0.
GDN_MERGES = {
    "mixer.in_proj.weight": ["attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
                             "attn.g_proj.weight", "attn.a_proj.weight", "attn.b_proj.weight"],
    "mixer.conv.weight": ["attn.q_conv1d.weight", "attn.k_conv1d.weight", "attn.v_conv1d.weight"],
    "mixer.conv.bias": ["attn.q_conv1d.bias", "attn.k_conv1d.bias", "attn.v_conv1d.bias"],
    "mlp.gate_up.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
}


def rename_tensors(tensors: dict, config: ModelConfig) -> dict:
    """Foreign tensor names -> mcserve's (unmapped names are kept, so the loader reports them)."""
    names = MAMBA2_NAMES
    if config.arch == "gated_deltanet":
        tensors, names = _merge_gdn(tensors, config), GDN_NAMES
    out = {}
    for name, tensor in tensors.items():
        for pattern, target in names:
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


def _merge_gdn(tensors: dict, config: ModelConfig) -> dict:
    """fla's separate projections and convolutions -> mcserve's fused ones, layer by layer (a
    part that is missing is left out, and the loader names the fused tensor as missing)."""
    tensors = dict(tensors)
    for i in range(config.n_layers):
        prefix = f"model.layers.{i}."
        for target, parts in GDN_MERGES.items():
            names = [prefix + part for part in parts]
            if not all(n in tensors for n in names):
                continue
            merged = torch.cat([tensors.pop(n) for n in names], dim=0)
            if target.endswith("conv.weight") and merged.dim() == 3:
                merged = merged.squeeze(1)  # Conv1d's [C, 1, W] -> ShortConv's [C, W]
            tensors[f"blocks.{i}.{target}"] = merged
    return tensors
