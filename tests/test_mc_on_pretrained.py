"""Memory Caching on a pretrained model: `--init-from DIR --train-only mc` freezes every weight
of a saved (or imported) model and trains only what MC adds, the connector u; `residual` needs
no training and is a load-time setting; grm on a checkpoint without u is a clear error."""

import subprocess
import sys

import httpx
import pytest
import torch

import models
from models.config import ConfigError
from models.train import TrainConfig, Trainer
from tests.server_helpers import running_server
from tests.test_train_generate import TEXT, TINY_MODEL

OPTIONS = dict(batch_size=4, seq_len=32, lr=3e-3, warmup=2, val_every=4, val_batches=2, ckpt_every=3,
               val_fraction=0.1)


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("MCSERVE_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):
    """A trained `none` model: the pretrained base."""
    out = tmp_path_factory.mktemp("base") / "none"
    Trainer(TrainConfig(data=[str(corpus)], out=str(out), model={**TINY_MODEL, "aggregation": "none"},
                        vocab_size=300, steps=6, **OPTIONS), log=lambda *a: None).train()
    return out


def frozen_and_trained(before: dict, after: dict, mc: dict) -> tuple[list, list]:
    """Names whose MC part moved, and names (or row ranges) outside MC that moved."""
    moved_mc, moved_other = [], []
    for name, old in before.items():
        new, rows = after[name], mc.get(name, "none")
        if rows == "none":
            if not torch.equal(old, new):
                moved_other.append(name)
        elif rows is None:
            moved_mc += [name] if not torch.equal(old, new) else []
        else:
            keep = torch.ones(new.shape[0], dtype=torch.bool)
            keep[rows] = False
            if not torch.equal(old[keep], new[keep]):
                moved_other.append(f"{name} (frozen rows)")
            moved_mc += [name] if not torch.equal(old[rows], new[rows]) else []
    return moved_mc, moved_other


@pytest.mark.parametrize("source", ["mcserve", "mamba2"])
def test_train_only_mc_moves_only_what_mc_adds(source, base, corpus, tmp_path):
    if source == "mamba2":
        from tests.test_import_mamba2 import reference_model, save_reference
        base = save_reference(reference_model("plain"), tmp_path / "mamba2")
    out = tmp_path / "grm"
    trainer = Trainer(TrainConfig(data=[str(corpus)], out=str(out), model={"aggregation": "grm", "segment_size": 16},
                                  init_from=str(base), train_only="mc", steps=4, **OPTIONS), log=lambda *a: None)
    start = models.load(base)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for name, tensor in start.state_dict().items():  # the base's weights, taken as they are
        rows = slice(0, tensor.shape[0])
        assert torch.equal(before[name][rows], tensor), name
    trainer.train()
    after = models.load(out)
    assert after.config.aggregation == "grm" and after.config.arch == start.config.arch
    moved_mc, moved_other = frozen_and_trained(before, after.state_dict(), after.mc_parameters())
    assert moved_other == [] and len(moved_mc) == after.config.n_layers


def test_train_only_mc_needs_a_base_and_something_to_train(base, corpus, tmp_path):
    with pytest.raises(ConfigError, match="needs init_from"):
        TrainConfig(data=[str(corpus)], out=str(tmp_path / "x"), train_only="mc")
    with pytest.raises(ConfigError, match="adds no parameters"):
        Trainer(TrainConfig(data=[str(corpus)], out=str(tmp_path / "y"), model={"aggregation": "residual"},
                            init_from=str(base), train_only="mc", **OPTIONS), log=lambda *a: None)
    done = subprocess.run([sys.executable, "-m", "server.cli", "train", str(corpus), "--out", str(tmp_path / "z"),
                           "--train-only", "mc"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "init_from" in done.stderr


def test_residual_is_a_load_time_setting_and_grm_without_u_is_a_clear_error(tmp_path):
    from tests.test_import_mamba2 import reference_model, save_reference
    directory = save_reference(reference_model("plain"), tmp_path / "mamba2-tiny")
    model = models.load(directory, overrides={"aggregation": "residual", "segment_size": 32})
    ids = torch.randint(0, 300, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - model.naive_forward(ids)).abs().max() < 1e-4
    with pytest.raises(models.ModelLoadError, match="needs the connector u") as err:
        models.load(directory, overrides={"aggregation": "grm"})
    assert "--train-only mc" in str(err.value)
    with running_server(directory, tmp_path / "s", model_set="aggregation=residual,segment_size=32") as (url, _):
        body = {"model": "mamba2-tiny", "prompt": ids[0].tolist(), "max_tokens": 4, "session_id": "r"}
        first = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        assert first["usage"]["completion_tokens"] == 4
        info = httpx.get(url + "/v1/sessions/r", timeout=60).json()
        assert info["checkpoints"] == info["tokens"] // 32 == 3  # residual caches checkpoints: sessions, prefix reuse
    done = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(directory), "--set",
                           "aggregation=grm", "--port", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "needs the connector u" in done.stderr


def test_init_from_refuses_a_config_change_that_is_not_mc(base, corpus, tmp_path):
    with pytest.raises(ValueError, match="only what Memory Caching adds"):
        Trainer(TrainConfig(data=[str(corpus)], out=str(tmp_path / "x"), model={"aggregation": "grm", "dk": 16},
                            init_from=str(base), **OPTIONS), log=lambda *a: None)
