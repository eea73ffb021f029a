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

ARCHS = ("mcserve", "mamba2")
MEMORIES = ("linear", "gla", "delta")
MLPS = ("swiglu", "none")
ARCH_KEYS = ("arch", "mlp", "n_groups", "proj_bias", "conv_bias", "dt_min", "dt_max")
AGGREGATIONS = ("none", "residual", "grm", "soup", "ssc")
BOUNDARIES = ("carry", "reset")


class ConfigError(ValueError):
    """A configuration key is unknown or has an impossible value."""


@dataclass(frozen=True)
class ModelConfig:
    # The parametrisation around the memory (models/mixer.py, models/mamba2.py): "mcserve" (its own
    # projections, L2-normed q and k, a sigmoid output gate) or "mamba2" (transformers' Mamba2:
    # k = B, q = C, v = dt x, log a = dt A, the D skip and the gated RMSNorm).
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
    # mamba2 only:
    n_groups: int = 1                # heads per group share B and C (k and q)
    proj_bias: bool = False          # biases on in_proj and out_proj
    conv_bias: bool = False          # a bias on the short convolution
    dt_min: float = 0.0              # dt is clamped to [dt_min, dt_max] after its softplus...
    dt_max: float = 0.0              # ...0: no upper limit

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
        if self.arch == "mamba2":
            if self.memory != "gla":
                raise ConfigError(f"arch 'mamba2' is a gla memory (SSD: a scalar decay per head), got memory {self.memory!r}")
            if self.n_groups < 1 or self.n_heads % self.n_groups:
                raise ConfigError(f"config key 'n_groups' must divide n_heads ({self.n_heads}), got {self.n_groups}")
            if self.conv_size < 2:
                raise ConfigError("arch 'mamba2' needs its short convolution: conv_size >= 2")
            if self.dt_min < 0 or (self.dt_max and self.dt_max < self.dt_min):
                raise ConfigError(f"dt limits must satisfy 0 <= dt_min <= dt_max (0: none), got "
                                  f"[{self.dt_min}, {self.dt_max}]")
            return
        for name, default in (("n_groups", 1), ("proj_bias", False), ("conv_bias", False), ("dt_min", 0.0),
                              ("dt_max", 0.0)):
            if getattr(self, name) != default:
                raise ConfigError(f"config key '{name}' is for arch 'mamba2' only (arch is {self.arch!r})")

    # --- derived -----------------------------------------------------------------------
    @property
    def caches_checkpoints(self) -> bool:
        """Whether segment checkpoints are kept at all (`none` never reads them)."""
        return self.aggregation != "none"

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
