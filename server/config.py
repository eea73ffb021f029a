"""Server configuration: one validated dataclass, filled from options or MCSERVE_* variables."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields


class ServerConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServerConfig:
    model: str = ""                      # model directory; "" = the bundled model
    host: str = "127.0.0.1"
    port: int = 8000
    session_store: str = ""              # a directory, file://DIR or redis://HOST:PORT/DB; "" = memory only
    session_dir: str = ""                # the older name of session_store (a directory)
    session_durability: str = "sync"     # sync: a turn's response ends once its session is durable; async: write-behind
    session_lease_s: float = 30.0        # a session's lease in the store, renewed while a request holds it
    api_key: str = field(default="", repr=False)  # one key, of the unnamed tenant; "" (and no keys file) = no authentication
    api_keys_file: str = ""              # a file of `KEY TENANT` lines: each tenant sees only its own sessions
    max_concurrent_per_tenant: int = 0   # requests in flight per tenant (429 beyond); 0 = no limit
    served_model_name: str = ""          # "" = the model directory's name
    max_prompt_tokens: int = 65536
    max_request_body_bytes: int = 8 << 20  # a larger request body is refused with 413, unread
    request_timeout_s: float = 30.0      # a request (headers and body) must arrive whole in this time, or its connection is closed
    max_connections: int = 1000          # open HTTP connections; one more is closed at once
    default_max_tokens: int = 0          # max_tokens when a request gives none; 0 = what is left of max_model_len (vLLM)
    max_queued_requests: int = 256
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    num_device_blocks: int = 2048
    num_host_blocks: int = 2048
    ckpt_dtype: str = "fp32"
    max_sessions_in_memory: int = 256
    max_session_memory_bytes: int = 2 << 30
    max_sessions_on_disk: int = 100_000  # sessions in the session store (all replicas), LRU evicted
    max_session_disk_bytes: int = 64 << 30  # physical bytes in the session store (shared blocks once)
    shutdown_grace_s: float = 30.0
    device: str = "auto"                 # auto (cuda if visible, else cpu), cpu, cuda, cuda:N
    kernels: str = "auto"                # decode/prefill on Triton kernels: auto (on CUDA), triton, torch
    cuda_graphs: str = "off"             # on: replay the decode step from CUDA graphs (Triton path on CUDA)
    model_set: str = ""                  # model config keys set on load: KEY=VALUE,KEY=VALUE (aggregation=residual)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ServerConfigError(f"port must be in 1..65535, got {self.port}")
        for f in fields(self):
            value = getattr(self, f.name)
            may_be_zero = f.name in ("default_max_tokens", "max_concurrent_per_tenant")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and f.name != "port" \
                    and (value < 0 if may_be_zero else value <= 0):
                raise ServerConfigError(f"{f.name} must be > 0, got {value}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ServerConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.cuda_graphs not in ("on", "off"):
            raise ServerConfigError(f"cuda_graphs must be on or off, got {self.cuda_graphs!r}")
        if self.session_durability not in ("sync", "async"):
            raise ServerConfigError(f"session_durability must be sync or async, got {self.session_durability!r}")
        self.model_overrides()  # a bad KEY=VALUE fails here, with the rest of the config
        if self.session_store and self.session_dir and self.session_store != self.session_dir:
            raise ServerConfigError(f"session_store ({self.session_store!r}) and its alias session_dir "
                                    f"({self.session_dir!r}) name different stores; give one")

    def model_overrides(self) -> dict:
        """`model_set` as a dict of model config keys."""
        from models.config import ConfigError, parse_setting
        try:
            return dict(parse_setting(item) for item in self.model_set.split(",") if item.strip())
        except ConfigError as e:
            raise ServerConfigError(f"model_set: {e}") from None

    @property
    def store(self) -> str:
        """Where sessions are kept ("" = this process's memory)."""
        return self.session_store or self.session_dir

    def torch_device(self) -> str:
        """The device to load the model on; a CUDA device that is not there is a config error."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ServerConfigError(f"device {self.device!r} asked for, but no CUDA GPU is visible")
        return self.device

    @classmethod
    def from_env(cls, overrides: dict, environ=os.environ) -> "ServerConfig":
        """Options given on the command line win over MCSERVE_<NAME> variables, which win over defaults."""
        values = {}
        for f in fields(cls):
            raw = environ.get(f"MCSERVE_{f.name.upper()}")
            if raw is not None:
                kind = type(f.default)
                try:
                    values[f.name] = kind(raw)
                except ValueError:
                    raise ServerConfigError(f"MCSERVE_{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
