"""Config validation, model save/load, the fingerprint, and every load error naming its cause."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import models
from tests.helpers import TINY, tiny_model, tokens


# --- config ----------------------------------------------------------------------------
def test_unknown_config_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(models.ConfigError, match=r"unknown config key\(s\) \['hidden'\].*allowed keys"):
        models.ModelConfig.from_dict({"hidden": 3})


@pytest.mark.parametrize("key,value,message", [
    ("memory", "lstm", r"'memory' must be one of \['linear', 'gla', 'delta'\]"),
    ("aggregation", "max", r"'aggregation' must be one of \['none', 'residual', 'grm', 'soup', 'ssc'\]"),
    ("boundary", "keep", r"'boundary' must be one of \['carry', 'reset'\]"),
    ("segment_size", 0, r"'segment_size' must be >= 1"),
    ("conv_size", 1, r"'conv_size' must be 0 \(off\) or >= 2"),
    ("norm_eps", 0.0, r"'norm_eps' must be in \(0, 1\)"),
    ("d_model", "256", r"'d_model' must be of type int"),
    ("tie_embeddings", 1, r"'tie_embeddings' must be of type bool"),
    ("n_heads", True, r"'n_heads' must be of type int"),
])
def test_impossible_config_values_are_named(key, value, message):
    with pytest.raises(models.ConfigError, match=message):
        models.ModelConfig.from_dict({key: value})


def test_config_round_trips_through_json():
    config = models.ModelConfig(**{**TINY, "memory": "delta", "aggregation": "ssc"})
    assert models.ModelConfig.from_dict(json.loads(config.to_json())) == config


# --- save / load -----------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = tiny_model(vocab_size=260)
    model.tokenizer = models.byte_tokenizer()
    models.save(model, tmp_path)
    return model, tmp_path


def test_load_gives_the_same_model_and_fingerprint(saved):
    model, path = saved
    loaded = models.load(path)
    assert loaded.fingerprint == model.fingerprint
    toks = tokens(2, 9)
    with torch.no_grad():
        assert torch.equal(loaded(toks), model(toks))
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("héllo")) == "héllo"
    assert "<|im_start|>assistant" in loaded.tokenizer.render_chat([{"role": "user", "content": "hi"}])


def test_fingerprint_follows_weights_and_config(saved):
    model, path = saved
    first = model.fingerprint
    assert models.load(path).fingerprint == first  # stable across loads
    with torch.no_grad():
        model.embed.weight[0, 0] += 1.0
    model.invalidate_fingerprint()
    assert model.fingerprint != first
    other = models.build({**model.config.to_dict(), "boundary": "reset"})
    other.load_state_dict(model.state_dict())
    assert other.fingerprint != model.fingerprint


def test_missing_files_are_named(saved, tmp_path):
    _, path = saved
    with pytest.raises(models.ModelLoadError, match="model directory not found"):
        models.load(tmp_path / "nope")
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        (path / name).unlink()
        with pytest.raises(models.ModelLoadError, match=f"missing .*{name}"):
            models.load(path)


def test_bad_config_json_is_named(saved):
    _, path = saved
    (path / "config.json").write_text(json.dumps({**TINY, "memory": "lstm"}))
    with pytest.raises(models.ModelLoadError, match=r"config.json: config key 'memory'"):
        models.load(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(models.ModelLoadError, match="config.json is not valid JSON"):
        models.load(path)


def test_wrong_shape_names_the_tensor(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "mlp_hidden": 48}))
    with pytest.raises(models.ModelLoadError, match=r"tensor 'blocks.0.mlp.down.weight' has shape \(32, 40\)"):
        models.load(path)


def test_wrong_dtype_missing_and_extra_tensors_are_named(saved):
    _, path = saved
    weights = load_file(path / "model.safetensors")
    bad = dict(weights, **{"norm.weight": weights["norm.weight"].to(torch.int32)})
    save_file(bad, path / "model.safetensors")
    with pytest.raises(models.ModelLoadError, match="tensor 'norm.weight' has dtype torch.int32"):
        models.load(path)
    save_file({k: v for k, v in weights.items() if k != "norm.weight"}, path / "model.safetensors")
    with pytest.raises(models.ModelLoadError, match="tensor 'norm.weight' is missing"):
        models.load(path)
    save_file(dict(weights, extra=torch.zeros(2)), path / "model.safetensors")
    with pytest.raises(models.ModelLoadError, match="unexpected tensor"):
        models.load(path)
    nan = dict(weights, **{"norm.weight": torch.full_like(weights["norm.weight"], float("nan"))})
    save_file(nan, path / "model.safetensors")
    with pytest.raises(models.ModelLoadError, match="'norm.weight' holds NaN"):
        models.load(path)


def test_bf16_weights_load(saved):
    model, path = saved
    weights = load_file(path / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, path / "model.safetensors")
    loaded = models.load(path)
    assert loaded.embed.weight.dtype == torch.float32
    assert torch.allclose(loaded.embed.weight, model.embed.weight, atol=1e-2)


def test_load_in_bf16_casts_the_weights_and_changes_the_fingerprint(saved):
    model, path = saved
    loaded = models.load(path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.fingerprint != model.fingerprint  # sessions are kept per dtype
    assert torch.equal(loaded.embed.weight, model.embed.weight.to(torch.bfloat16))


def test_truncated_weights_are_named(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    for cut in (10, len(data) // 2, len(data) - 3):
        (path / "model.safetensors").write_bytes(data[:cut])
        with pytest.raises(models.ModelLoadError, match="model.safetensors: corrupt or truncated"):
            models.load(path)


def test_bad_tokenizer_is_named(saved):
    _, path = saved
    (path / "tokenizer.json").write_text("{}")
    with pytest.raises(models.ModelLoadError, match="tokenizer.json: not a valid tokenizer.json"):
        models.load(path)


def test_bad_chat_template_is_named(saved):
    _, path = saved
    (path / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(models.ModelLoadError, match="chat template is not valid Jinja"):
        models.load(path)
