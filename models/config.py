"""The model's configuration: one validated dataclass.

Every value is checked when the object is made, and every error names the key and what is
allowed, so a bad `config.json` fails at load time with a message a user can act on.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ARCHS = ("mcserve", "mamba2", "gated_deltanet")
MEMORIES = ("linear", "gla", "delta")
MLPS = ("swiglu", "none")
GATE_ACTIVATIONS = ("swish", "sigmoid")
# Keys that only some parametrisations read, and which ones.
ARCH_ONLY = {"n_groups": ("mamba2", "gated_deltanet"), "proj_bias": ("mamba2",),
             "conv_bias": ("mamba2", "gated_deltanet"), "dt_min": ("mamba2",), "dt_max": ("mamba2",),
             "gate_activation": ("gated_deltanet",), "neg_eigval": ("gated_deltanet",)}
ARCH_KEYS = ("arch", "mlp", *ARCH_ONLY)
AGGREGATIONS = ("none", "residual", "grm", "soup", "ssc")
BOUNDARIES = ("carry", "reset")


class ConfigError(ValueError):
    """A configuration key is unknown or has an impossible value."""


@dataclass(frozen=True)
class ModelConfig:
    # The parametrisation around the memory: "mcserve" (models/mixer.py: its own projections,
    # L2-normed q and k, a sigmoid output gate), "mamba2" (models/mamba2.py, transformers' Mamba2:
    # k = B, q = C, v = dt x, log a = dt A, the D skip, the gated RMSNorm) or "gated_deltanet"
    # (models/gated_deltanet.py, flash-linear-attention's GatedDeltaNet).
    arch: str = "mcserve"
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    dk: int = 64
    dv: int = 64
    mlp_hidden: int = 704
    memory: str = "gla"
    aggregation: str = "grm"
    segment_size: int = 64
    boundary: str = "carry"
    ssc_top_k: int = 2
    conv_size: int = 4
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    # For `delta` memory only: use the gla-style decay a_t (gated delta rule) or a_t = 1.
    delta_decay: bool = True
    mlp: str = "swiglu"              # the block's MLP after the mixer; "none": the mixer alone (Mamba2)
    # mamba2 and gated_deltanet only:
    n_groups: int = 1                # groups of heads that share k and q (Mamba2's B and C; GDN's q/k heads)
    proj_bias: bool = False          # biases on in_proj and out_proj
    conv_bias: bool = False          # a bias on the short convolution
    dt_min: float = 0.0              # dt is clamped to [dt_min, dt_max] after its softplus...
    dt_max: float = 0.0              # ...0: no upper limit
    # gated_deltanet only:
    gate_activation: str = "swish"   # of the output gate: swish (silu) or sigmoid
    neg_eigval: bool = False         # beta in (0, 2) rather than (0, 1)

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "dk", "dv",
                     "mlp_hidden", "segment_size", "ssc_top_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{name}' must be >= 1, got {getattr(self, name)}")
        _check_choice("memory", self.memory, MEMORIES)
        _check_choice("aggregation", self.aggregation, AGGREGATIONS)
        _check_choice("boundary", self.boundary, BOUNDARIES)
        _check_choice("arch", self.arch, ARCHS)
        _check_choice("mlp", self.mlp, MLPS)
        self._check_arch()
        if self.conv_size < 0 or self.conv_size == 1:
            raise ConfigError(
                f"config key 'conv_size' must be 0 (off) or >= 2, got {self.conv_size}")
        if not (0.0 < self.norm_eps < 1.0):
            raise ConfigError(f"config key 'norm_eps' must be in (0, 1), got {self.norm_eps}")

    def _check_arch(self) -> None:
        defaults = {f.name: f.default for f in fields(self)}
        for name, archs in ARCH_ONLY.items():
            if self.arch not in archs and getattr(self, name) != defaults[name]:
                raise ConfigError(f"config key '{name}' is for arch {' or '.join(map(repr, archs))} only "
                                  f"(arch is {self.arch!r})")
        memory = {"mamba2": "gla", "gated_deltanet": "delta"}.get(self.arch)
        if memory is None:
            return
        if self.memory != memory:
            raise ConfigError(f"arch {self.arch!r} is a {memory} memory, got memory {self.memory!r}")
        if self.n_groups < 1 or self.n_heads % self.n_groups:
            raise ConfigError(f"config key 'n_groups' must divide n_heads ({self.n_heads}), got {self.n_groups}")
        if self.conv_size < 2:
            raise ConfigError(f"arch {self.arch!r} needs its short convolution: conv_size >= 2")
        if self.dt_min < 0 or (self.dt_max and self.dt_max < self.dt_min):
            raise ConfigError(f"dt limits must satisfy 0 <= dt_min <= dt_max (0: none), got "
                              f"[{self.dt_min}, {self.dt_max}]")
        _check_choice("gate_activation", self.gate_activation, GATE_ACTIVATIONS)

    # --- derived -----------------------------------------------------------------------
    @property
    def scores_segments(self) -> bool:
        """Whether the model has the connector `u_t` that scores segments."""
        return self.aggregation in ("grm", "soup", "ssc")

    @property
    def score_scale(self) -> float:
        return 1.0 / math.sqrt(self.dk)

    # --- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every key, except the architecture keys still at their defaults: a model saved before
        they existed keeps its config.json, and so its fingerprint and its saved sessions."""
        values = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in fields(self)}
        return {k: v for k, v in values.items() if k not in ARCH_KEYS or v != defaults[k]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        if not isinstance(values, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {unknown}; allowed keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(values)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def parse_setting(text: str) -> tuple[str, Any]:
    """KEY=VALUE (a `--set` option) -> (key, value); the value is JSON if it parses, else a string."""
    if "=" not in text:
        raise ConfigError(f"a setting is key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string such as memory=gla
    return key.strip(), value


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{name}' must be one of {list(allowed)}, got {value!r}")


def _check_type(name: str, value: Any, type_name: Any) -> None:
    # `from __future__ import annotations` makes field types strings.
    expected = {"int": int, "float": (int, float), "str": str, "bool": bool}[str(type_name)]
    wrong_bool = isinstance(value, bool) and expected is not bool
    if wrong_bool or not isinstance(value, expected):
        raise ConfigError(
            f"config key '{name}' must be of type {type_name}, got {type(value).__name__} ({value!r})")
