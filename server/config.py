"""Server configuration: one validated dataclass tree (the server's own options, the engine's
EngineConfig, the store's SessionLimits), set from the command line, MCSERVE_* variables and a
YAML file, in that order of precedence, over the defaults. Every option explains itself
(engine/options.py): `mcserve serve --help` is generated from here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from engine.options import ConfigError, Option, build, check_options, flat_values, option, options
from engine.session_index import SessionLimits
from engine.store.backend import mask_password


class ServerConfigError(ConfigError):
    pass


@dataclass(frozen=True)
class ServerConfig:
    model: str = option("", "model directory: an mcserve model, or a transformers / flash-linear-attention "
                        "checkpoint; '' = the bundled model")
    model_set: str = option("", "model config keys set on load, KEY=VALUE,KEY=VALUE (--set KEY=VALUE, repeatable)")
    served_model_name: str = option("", "the model's name in the API; '' = the model directory's name")
    device: str = option("auto", "where the model runs: auto (cuda if visible, else cpu), cpu, cuda, cuda:N")
    dtype: str = option("fp32", "the weights' dtype; bf16 halves their memory and speeds up prefill on CPUs with "
                        "AVX-512 BF16 or AMX and on GPUs (the recurrent state and its checkpoints stay fp32; "
                        "sessions are kept per dtype)", choices=("fp32", "bf16"))
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on")
    log_format: str = option("text", "log lines as text, or as JSON objects (with the request id) for log "
                             "collectors", choices=("text", "json"))
    api_key: str = option("", "a key of the unnamed tenant ('Authorization: Bearer KEY'); no key and no keys "
                          "file = no authentication", secret=True)
    api_keys_file: str = option("", "a file of 'KEY TENANT' lines: each tenant sees only its own sessions")
    max_concurrent_per_tenant: int = option(0, "requests in flight per tenant before 429; 0 = no limit",
                                            unit="requests")
    max_prompt_tokens: int = option(65536, "longest prompt", unit="tokens")
    default_max_tokens: int = option(0, "max_tokens of a request that gives none; 0 = what is left of "
                                     "max_model_len", unit="tokens")
    max_request_body_bytes: int = option(8 << 20, "a larger request body gets 413, unread", unit="bytes")
    request_timeout_s: float = option(30.0, "a request (headers and body) must arrive whole in this time, "
                                      "or its connection is closed", unit="s")
    max_connections: int = option(1000, "open HTTP connections; one more is closed at once", unit="connections")
    shutdown_grace_s: float = option(30.0, "on SIGTERM, in-flight requests get this long to finish, then "
                                     "end with their sessions saved", unit="s")
    session_store: str = option("", "where sessions are kept: a directory, file://DIR or "
                                "redis://HOST:PORT/DB; '' = this process's memory (lost on restart)")
    session_dir: str = option("", "the older name of --session-store (a directory)")
    session_durability: str = option("sync", "sync: a turn's response ends once its session is durable; "
                                     "async: written behind", choices=("sync", "async"))
    session_lease_s: float = option(30.0, "a session's lease in the store, renewed while a request holds it",
                                    unit="s")
    engine: EngineConfig = option(default_factory=EngineConfig)
    limits: SessionLimits = option(default_factory=SessionLimits)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ServerConfigError(f"port must be in 1..65535, got {self.port}")
        check_options(self, ServerConfigError, may_be_zero=("default_max_tokens", "max_concurrent_per_tenant"))
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ServerConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        self.model_overrides()  # a bad KEY=VALUE fails here, with the rest of the config
        if self.session_store and self.session_dir and self.session_store != self.session_dir:
            raise ServerConfigError(f"session_store ({self.session_store!r}) and its alias session_dir "
                                    f"({self.session_dir!r}) name different stores; give one")

    def model_overrides(self) -> dict:
        """`model_set` as a dict of model config keys."""
        from models.config import ConfigError as ModelConfigError
        from models.config import parse_setting
        try:
            return dict(parse_setting(item) for item in self.model_set.split(",") if item.strip())
        except ModelConfigError as e:
            raise ServerConfigError(f"model_set: {e}") from None

    @property
    def store(self) -> str:
        """Where sessions are kept ("" = this process's memory)."""
        return self.session_store or self.session_dir

    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16}[self.dtype]

    def torch_device(self) -> str:
        """The device to load the model on; a CUDA device that is not there is a config error."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ServerConfigError(f"device {self.device!r} asked for, but no CUDA GPU is visible")
        return self.device

    # --- building ----------------------------------------------------------------------------
    @classmethod
    def from_options(cls, values: dict[str, Any]) -> "ServerConfig":
        """From flat option values (`num_device_blocks=...`); the rest keep their defaults."""
        known = {o.name for o in OPTIONS}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ServerConfigError(f"unknown option {unknown[0]!r}")
        try:
            return build(cls, values)
        except ConfigError as e:
            raise ServerConfigError(str(e)) from None

    @classmethod
    def load(cls, cli: dict[str, Any], environ=os.environ, file: str | None = None) -> "ServerConfig":
        """Command line > MCSERVE_* environment > the YAML `file` (or MCSERVE_CONFIG) > defaults."""
        values: dict[str, Any] = {}
        file = file or environ.get("MCSERVE_CONFIG")
        if file:
            values.update(read_config_file(Path(file)))
        for opt in OPTIONS:
            raw = environ.get(opt.env)
            if raw is not None:
                values[opt.name] = parse(opt, raw, where=opt.env)
        values.update({k: v for k, v in cli.items() if v is not None})
        return cls.from_options(values)

    def describe(self) -> dict[str, Any]:
        """Every option's effective value, secrets and passwords masked (the start-up log line)."""
        values = flat_values(self)
        for name in ("session_store", "session_dir"):
            values[name] = mask_password(values[name])
        return values


OPTIONS: list[Option] = options(ServerConfig)


def parse(opt: Option, raw: Any, where: str) -> Any:
    """A value from the command line, the environment or the file, checked against its type."""
    if not isinstance(raw, str):
        fits = isinstance(raw, opt.kind) and not (opt.kind is not bool and isinstance(raw, bool))
        if opt.kind is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if not fits:
            raise ServerConfigError(f"{where}: {opt.name} must be a {opt.kind.__name__}, got {raw!r}")
        return raw
    try:
        return opt.parse(raw)
    except ValueError as e:
        raise ServerConfigError(f"{where}: {e}") from None


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML mapping of option names (as on the command line, with - or _) to values."""
    import yaml
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ServerConfigError(f"cannot read --config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ServerConfigError(f"--config {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ServerConfigError(f"--config {path} must be a mapping of option names to values")
    by_name = {o.name: o for o in OPTIONS}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in by_name:
            raise ServerConfigError(f"--config {path}: unknown option {key!r}")
        values[name] = parse(by_name[name], value, where=f"--config {path}")
    return values


