"""`mcserve train` and `mcserve generate` on a tiny model and a small text."""

import json
import os
import subprocess
import sys

import pytest
import torch

import models
from engine.detokenizer import IncrementalDetokenizer
from engine.generate import generate_ids
from engine.params import SamplingError, SamplingParams
from models.train import TrainConfig, Trainer

TEXT = "".join(f"Day {i}. The whale swam under the ship and the sailors watched the sea. " * 3 + "\n\n"
               for i in range(300))
TINY_MODEL = dict(d_model=32, n_layers=2, n_heads=2, dk=8, dv=8, mlp_hidden=64, segment_size=8,
                  memory="gla", aggregation="grm")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT)
    return path


def train_config(corpus, out, steps, **kw):
    return TrainConfig(data=[str(corpus)], out=str(out), model=TINY_MODEL, vocab_size=300, steps=steps,
                       batch_size=4, seq_len=32, lr=3e-3, warmup=2, val_every=4, val_batches=2,
                       ckpt_every=3, val_fraction=0.1, **kw)


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("MCSERVE_NO_PROGRESS", "1")


def test_training_lowers_loss_and_writes_a_loadable_model(corpus, tmp_path):
    trainer = Trainer(train_config(corpus, tmp_path, steps=12), log=lambda *a: None)
    first = trainer.loss(trainer.batch_for(0)).item()
    summary = trainer.train()
    assert trainer.loss(trainer.batch_for(0)).item() < first - 0.5
    assert summary["val_loss"] is not None and summary["val_loss"] < first
    model = models.load(tmp_path)
    assert model.tokenizer.vocab_size == model.config.vocab_size == 300
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 13))


def test_resume_continues_from_the_same_step_exactly(corpus, tmp_path):
    straight = Trainer(train_config(corpus, tmp_path / "a", steps=6), log=lambda *a: None)
    straight.train()
    interrupted = Trainer(train_config(corpus, tmp_path / "b", steps=6), log=lambda *a: None)
    interrupted.train(stop_at=3)
    resumed = Trainer(train_config(corpus, tmp_path / "b", steps=6), resume=True, log=lambda *a: None)
    assert resumed.step == 3
    resumed.train()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_train_config_errors_name_the_option(corpus, tmp_path):
    with pytest.raises(models.ConfigError, match="'dtype' must be one of"):
        train_config(corpus, tmp_path, steps=2, dtype="fp8")
    with pytest.raises(models.ConfigError, match="'memory' must be one of"):
        TrainConfig(data=[str(corpus)], out=str(tmp_path), model={"memory": "lstm"})
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        Trainer(train_config(corpus, tmp_path / "none", steps=2), resume=True)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    os.environ["MCSERVE_NO_PROGRESS"] = "1"
    Trainer(train_config(corpus, out, steps=8), log=lambda *a: None).train()
    return out


def test_greedy_generation_is_deterministic(trained):
    model = models.load(trained)
    ids = model.tokenizer.encode("The whale")
    params = SamplingParams(max_tokens=20, temperature=0.0)
    first = list(generate_ids(model, ids, params))
    assert len(first) == 20 and first == list(generate_ids(model, ids, params))
    seeded = SamplingParams(max_tokens=20, temperature=1.0, seed=7)
    assert list(generate_ids(model, ids, seeded)) == list(generate_ids(model, ids, seeded))
    detok = IncrementalDetokenizer(model.tokenizer)
    assert "".join(detok.add(t) for t in first) + detok.finish() == model.tokenizer.decode(first)


def test_sampling_params_are_checked():
    with pytest.raises(SamplingError, match="'top_p' must be in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(SamplingError, match="'temperature'"):
        SamplingParams(temperature=-1.0)


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "MCSERVE_NO_PROGRESS": "1"})


def test_cli_generate_streams_and_reports_bad_input_in_one_line(trained):
    ok = run_cli("generate", "The whale", "--model", str(trained), "--max-tokens", "8", "--seed", "1")
    assert ok.returncode == 0 and ok.stdout.startswith("The whale")
    chat = run_cli("generate", "hi", "--model", str(trained), "--max-tokens", "4", "--chat", "--temperature", "0")
    assert chat.returncode == 0
    for bad, message in [(["--model", "/nonexistent"], "model directory not found"),
                         (["--model", str(trained), "--top-p", "2"], "'top_p' must be in"),
                         (["--model", str(trained), "--max-tokens", "0"], "'max_tokens' must be >= 1")]:
        res = run_cli("generate", "x", *bad)
        assert res.returncode == 2 and message in res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run_cli("generate", "x", "--temperature", "warm")
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_cli_train_bad_options_are_one_line(corpus, tmp_path):
    res = run_cli("train", str(corpus), "--out", str(tmp_path), "--set", "memory=lstm")
    assert res.returncode == 2 and "'memory' must be one of" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("train", str(tmp_path / "missing.txt"), "--out", str(tmp_path))
    assert res.returncode == 2 and "training file not found" in res.stderr


def test_evaluate_scores_held_out_windows(trained):
    from models.evaluate import evaluate, windows
    model = models.load(trained)
    assert [len(w) for w in windows([list(range(10)), list(range(25))], 8)] == [9, 9, 9]
    rows = evaluate(model, [TEXT[:3000], TEXT[3000:9000]], [16, 64, 100000])
    assert rows[0]["windows"] > rows[1]["windows"] > 0 and rows[2]["windows"] == 0
    assert 0 < rows[0]["loss"] < 10 and 0 < rows[1]["loss_second_half"] < 10
