"""Build, save and load models.

A model directory holds `config.json`, `model.safetensors`, `tokenizer.json` and optionally
`chat_template.jinja` (ChatML when absent). Loading checks everything and names the file and
tensor at fault.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig
from .model import MCModel
from .tokenizer import Tokenizer, TokenizerError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TEMPLATE_FILE = "chat_template.jinja"
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ModelLoadError(ValueError):
    """A model directory is missing a file or holds a bad one; the message names it."""


def build(config: ModelConfig | dict, seed: int | None = None) -> MCModel:
    """A randomly initialised model from a config (or a dict of config keys)."""
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    if seed is not None:
        torch.manual_seed(seed)
    return MCModel(config)


def save(model: MCModel, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(model.config.to_json() + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"fingerprint": model.fingerprint})
    if model.tokenizer is not None:
        model.tokenizer.save(path)


def load(path: str | Path, device: str | torch.device = "cpu", require_tokenizer: bool = True) -> MCModel:
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory not found: {path}")
    config = _load_config(path / CONFIG_FILE)
    model = MCModel(config)
    _load_weights(model, path / WEIGHTS_FILE)
    model.tokenizer = _load_tokenizer(path, config, require_tokenizer)
    return model.to(device).eval()


def _load_config(file: Path) -> ModelConfig:
    if not file.is_file():
        raise ModelLoadError(f"missing {file}")
    try:
        return ModelConfig.from_json_file(file)
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None


def _load_weights(model: MCModel, file: Path) -> None:
    if not file.is_file():
        raise ModelLoadError(f"missing {file}")
    expected = model.state_dict()
    loaded = {}
    try:
        with safe_open(str(file), framework="pt") as f:
            names = set(f.keys())
            for name in sorted(expected):
                if name not in names:
                    raise ModelLoadError(f"{file}: tensor {name!r} is missing")
                loaded[name] = f.get_tensor(name)
    except ModelLoadError:
        raise
    except Exception as e:  # safetensors raises several types for corrupt/truncated files
        raise ModelLoadError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    unexpected = sorted(names - set(expected))
    if unexpected:
        raise ModelLoadError(f"{file}: unexpected tensor(s) {unexpected[:5]} for this config")
    for name, tensor in loaded.items():
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape):
            raise ModelLoadError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"config.json implies {tuple(want.shape)}")
        if tensor.dtype not in WEIGHT_DTYPES:
            raise ModelLoadError(f"{file}: tensor {name!r} has dtype {tensor.dtype}, "
                                 f"expected one of {[str(d) for d in WEIGHT_DTYPES]}")
        if not torch.isfinite(tensor).all():
            raise ModelLoadError(f"{file}: tensor {name!r} holds NaN or infinite values")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in loaded.items()})
    model.invalidate_fingerprint()


def _load_tokenizer(path: Path, config: ModelConfig, required: bool) -> Tokenizer | None:
    file = path / TOKENIZER_FILE
    if not file.is_file():
        if required:
            raise ModelLoadError(f"missing {file}")
        return None
    template_file = path / TEMPLATE_FILE
    template = template_file.read_text() if template_file.is_file() else None
    try:
        tokenizer = Tokenizer.from_file(file, template)
    except TokenizerError as e:
        raise ModelLoadError(str(e)) from None
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelLoadError(f"{file}: tokenizer has {tokenizer.vocab_size} tokens, more than "
                             f"config.json's vocab_size {config.vocab_size}")
    return tokenizer


def read_config(path: str | Path) -> ModelConfig:
    """The config of a saved model, without loading weights."""
    return _load_config(Path(path) / CONFIG_FILE)
