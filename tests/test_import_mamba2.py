"""Mamba2 checkpoints saved by transformers load as they are and compute what transformers
computes: random-initialised `Mamba2ForCausalLM`s made by transformers itself, in three
configurations (grouped B and C, head and state sizes that are not powers of two, biases, tied
embeddings, a dt limit). mcserve's naive, chunked and prefill + decode logits equal the
reference's over 320 tokens (five segments), and greedy generation through the engine and
through the HTTP server equals transformers' greedy loop."""

import json

import httpx
import pytest
import torch

import models
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.params import SamplingParams
from tests.reference_helpers import VOCAB, path_errors, reference_pair, save_reference, served_text, tokens

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "plain": dict(hidden_size=64, num_heads=4, head_dim=32, state_size=16, n_groups=1, expand=2),
    "groups": dict(hidden_size=48, num_heads=6, head_dim=16, state_size=12, n_groups=3, expand=2,
                   conv_kernel=3),
    "odd": dict(hidden_size=40, num_heads=5, head_dim=24, state_size=10, n_groups=5, expand=3, use_bias=True,
                tie_word_embeddings=True, time_step_limit=(0.0, 0.05)),
}
TOL = 1e-4


def reference_model(name, seed=0):
    torch.manual_seed(seed)
    config = transformers.Mamba2Config(vocab_size=VOCAB, num_hidden_layers=2, layer_norm_epsilon=1e-5,
                                       eos_token_id=256, pad_token_id=256, bos_token_id=256, **CONFIGS[name])
    model = transformers.Mamba2ForCausalLM(config).float().eval()
    with torch.no_grad():  # away from the initial values, so every parameter is exercised
        for pname, p in model.named_parameters():
            if pname.endswith("A_log"):
                p.add_(0.5 * torch.rand_like(p))
            elif pname.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif pname.endswith("dt_bias"):
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15 if "conv1d" in pname else 0.05)
    return model


pair = reference_pair(lambda name: reference_model(name), CONFIGS, "mamba2-tiny")


def test_the_config_and_tensors_map_onto_mcserve(pair):
    name, reference, model, _ = pair
    c = model.config
    assert (c.arch, c.memory, c.aggregation, c.mlp) == ("mamba2", "gla", "none", "none")
    assert (c.n_heads, c.dv, c.dk, c.n_groups) == (reference.config.num_heads, reference.config.head_dim,
                                                  reference.config.state_size, reference.config.n_groups)
    ours = sum(p.numel() for p in model.parameters())
    theirs = sum(p.numel() for p in reference.parameters())
    assert ours == theirs - (VOCAB * c.d_model if c.tie_embeddings and reference.lm_head.weight is not
                             reference.backbone.embeddings.weight else 0)


def test_logits_equal_the_reference_on_every_path(pair):
    name, reference, model, _ = pair
    errors = path_errors(reference, model)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("name", ["plain", "groups"])
def test_engine_greedy_equals_the_references_greedy_loop(name, tmp_path):
    # (transformers' own decode step ignores time_step_limit, so "odd" is compared on logits only)
    reference = reference_model(name)
    model = models.load(save_reference(reference, tmp_path / "m"))
    prompts = [tokens(n, seed=n)[0].tolist() for n in (5, 70, 150)]
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, num_device_blocks=32, max_prefill_chunk=48))
    got = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    for prompt, ours in zip(prompts, got):
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24)
        assert ours == out[0, len(prompt):].tolist()


def test_greedy_through_the_http_server_equals_the_reference(tmp_path):
    from tests.server_helpers import running_server
    reference = reference_model("plain")
    directory = save_reference(reference, tmp_path / "mamba2-tiny")
    prompt = tokens(90, seed=7)[0].tolist()
    want = reference.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20)
    text = served_text(models.load(directory).tokenizer, want[0, len(prompt):].tolist())
    with running_server(directory, tmp_path / "sessions") as (url, _):
        body = {"model": "mamba2-tiny", "prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
        answer = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == text
        chat = {"model": "mamba2-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert httpx.post(url + "/v1/chat/completions", json=chat, timeout=60).status_code == 200


def test_what_cannot_be_honoured_is_a_one_line_error(tmp_path):
    reference = reference_model("plain")
    directory = save_reference(reference, tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    for change, message in [({"architectures": ["FalconMambaForCausalLM"]}, "not supported"),
                            ({"architectures": None, "model_type": None, "ssm_cfg": {"layer": "Mamba2"}},
                             "mamba_ssm checkpoint"),
                            ({"hidden_act": "gelu"}, "hidden_act"),
                            ({"expand": 3}, "expand"),
                            ({"n_groups": 3}, "n_groups")]:
        (directory / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(models.ModelLoadError, match=message) as err:
            models.load(directory)
        assert "\n" not in str(err.value)


def test_mcserve_info_says_what_was_loaded(tmp_path):
    import subprocess
    import sys
    directory = save_reference(reference_model("groups"), tmp_path / "m")
    done = subprocess.run([sys.executable, "-m", "server.cli", "info", str(directory)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["loaded_as"] == "Mamba2ForCausalLM" and info["config"]["arch"] == "mamba2"
    assert info["config"]["n_groups"] == 3 and info["tokenizer_vocab"] == 259


def test_a_transformers_checkpoint_serves_and_resumes_exactly_after_kill_9(tmp_path):
    """`mcserve serve --model DIR` on the directory transformers saved, no other step; a
    session turn survives kill -9 right after its response, and the next turn reads most of its
    prompt from the session and answers as transformers does on the whole prompt."""
    from tests.server_helpers import ServerProcess
    reference = reference_model("plain")
    directory = save_reference(reference, tmp_path / "mamba2-tiny")
    tokenizer = models.load(directory).tokenizer

    def hf_greedy(prompt, n=8):
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
        return out[0, len(prompt):].tolist()

    def complete(server, prompt):
        body = {"model": "mamba2-tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "session_id": "conv"}
        answer = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()

    server = ServerProcess(directory, tmp_path / "server.log", "--session-store", str(tmp_path / "store")).start()
    try:
        p1 = tokens(150, seed=3)[0].tolist()
        out1 = hf_greedy(p1)
        assert complete(server, p1)["choices"][0]["text"] == served_text(tokenizer, out1)
        server.kill()  # at once after the response
        server.start()
        p2 = p1 + out1 + tokens(30, seed=4)[0].tolist()
        second = complete(server, p2)
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0.8 * len(p2)
        assert second["choices"][0]["text"] == served_text(tokenizer, hf_greedy(p2))
    finally:
        server.stop()


def test_a_sharded_checkpoint_loads_and_generate_runs_on_it(tmp_path):
    import subprocess
    import sys
    reference = reference_model("groups")
    whole = models.load(save_reference(reference, tmp_path / "whole"))
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="20KB")  # transformers writes an index and shards
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((tmp_path / "whole" / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    assert models.load(sharded).fingerprint == whole.fingerprint
    (sharded / sorted(sharded.glob("model-*.safetensors"))[0].name).unlink()
    with pytest.raises(models.ModelLoadError, match="named by model.safetensors.index.json"):
        models.load(sharded)
    done = subprocess.run([sys.executable, "-m", "server.cli", "generate", "Once", "--model", str(tmp_path / "whole"),
                           "--max-tokens", "5", "--temperature", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Once")
