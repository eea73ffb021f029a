"""Build, save and load models.

A model directory holds `config.json`, `model.safetensors`, `tokenizer.json` and optionally
`chat_template.jinja` (ChatML when absent). A directory saved by another library (a config.json
with `architectures`, see models/hf_import.py) loads as it is: its config and tensor names are
mapped, the weights may be sharded (`model.safetensors.index.json`) and the chat template and
end-of-sequence tokens come from its tokenizer_config.json. Loading checks everything and names
the file and tensor at fault.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import hf_import
from .config import ConfigError, ModelConfig
from .model import MCModel
from .tokenizer import Tokenizer, TokenizerError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
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


def load(path: str | Path, device: str | torch.device = "cpu", require_tokenizer: bool = True,
         overrides: dict | None = None, dtype: torch.dtype = torch.float32) -> MCModel:
    """Load a model directory (mcserve's or a supported foreign one). `overrides` sets config
    keys on top of a foreign config (mcserve's own: segment_size, aggregation...). `dtype`: the
    weights' (the recurrent state is fp32 whatever it is)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory not found: {path}")
    values = _read_json(path / CONFIG_FILE)
    foreign = hf_import.is_foreign(values)
    config = _config_from(values, path / CONFIG_FILE, overrides)
    model = MCModel(config)
    tensors, source = _read_tensors(path)
    if foreign:
        tensors = hf_import.rename_tensors(tensors, config)
    _install_weights(model, tensors, source)
    model.tokenizer = _load_tokenizer(path, config, require_tokenizer, values if foreign else None)
    model.source = hf_import.architecture(values) if foreign else "mcserve"
    model = model.to(device=device, dtype=dtype).eval()
    model.invalidate_fingerprint()  # the weights' dtype is part of the model's identity
    return model


def _config_from(values: dict, file: Path, overrides: dict | None = None) -> ModelConfig:
    try:
        if hf_import.is_foreign(values):
            return hf_import.config_from_hf(values, overrides)
        return ModelConfig.from_dict({**values, **(overrides or {})})
    except ConfigError as e:
        raise ModelLoadError(f"{file}: {e}") from None


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise ModelLoadError(f"missing {file}")
    try:
        values = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise ModelLoadError(f"{file}: a model config must be a JSON object")
    return values


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Every tensor of model.safetensors, or of the shards a model.safetensors.index.json names."""
    single, index = path / WEIGHTS_FILE, path / WEIGHTS_INDEX
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: no 'weight_map'")
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        raise ModelLoadError(f"missing {single}")
    tensors = {}
    for file in files:
        if not file.is_file():
            raise ModelLoadError(f"missing {file} (named by {index.name})")
        try:
            with safe_open(str(file), framework="pt") as f:
                tensors.update({name: f.get_tensor(name) for name in f.keys()})
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
            raise ModelLoadError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    return tensors, files[0] if len(files) == 1 else index


def _install_weights(model: MCModel, loaded: dict[str, torch.Tensor], file: Path) -> None:
    expected = model.state_dict()
    mc = model.mc_parameters()
    lacking = [n for n in mc if n not in loaded or loaded[n].shape != expected[n].shape]
    if lacking:
        raise ModelLoadError(f"{file}: aggregation {model.config.aggregation!r} needs the connector u ({lacking[0]!r}), "
                             "which this checkpoint lacks; train it with `mcserve train DATA --init-from DIR "
                             f"--train-only mc --set aggregation={model.config.aggregation} --out NEW`, or use "
                             "aggregation=residual, which needs no training")
    for name in sorted(expected):
        if name not in loaded:
            raise ModelLoadError(f"{file}: tensor {name!r} is missing")
    unexpected = sorted(set(loaded) - set(expected))
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


def _load_tokenizer(path: Path, config: ModelConfig, required: bool, foreign: dict | None = None) -> Tokenizer | None:
    file = path / TOKENIZER_FILE
    if not file.is_file():
        if required:
            raise ModelLoadError(f"missing {file}")
        return None
    template_file = path / TEMPLATE_FILE
    template = template_file.read_text() if template_file.is_file() else None
    special = {}
    if foreign is not None:  # a foreign tokenizer: its template and special tokens, from its own files
        settings = _read_json(path / TOKENIZER_CONFIG) if (path / TOKENIZER_CONFIG).is_file() else {}
        template = template or _chat_template(settings)
        special = {key: _token_text(settings.get(key)) for key in ("bos_token", "eos_token")}
    try:
        tokenizer = Tokenizer.from_file(file, template, special_tokens=special,
                                        eos_ids=_eos_ids(foreign) if foreign is not None else None)
    except TokenizerError as e:
        raise ModelLoadError(str(e)) from None
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelLoadError(f"{file}: tokenizer has {tokenizer.vocab_size} tokens, more than "
                             f"config.json's vocab_size {config.vocab_size}")
    return tokenizer


def _chat_template(settings: dict) -> str | None:
    """tokenizer_config.json's chat template: a string, or a list of named ones ("default")."""
    template = settings.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _token_text(token) -> str | None:
    if isinstance(token, dict):  # an AddedToken, as older tokenizer_config.json files write it
        token = token.get("content")
    return token if isinstance(token, str) else None


def _eos_ids(values: dict) -> list[int]:
    eos = values.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return [int(i) for i in ids]
