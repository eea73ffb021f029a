"""Gated DeltaNet checkpoints saved by flash-linear-attention load as they are and compute what
fla computes: random-initialised `GatedDeltaNetForCausalLM`s made by fla 0.6.0 itself (its
`fused_recurrent` mode, in the Triton interpreter on the CPU), in three configurations (grouped
value heads, head sizes that are not powers of two, a sigmoid output gate, negative eigenvalues).
mcserve's naive, chunked and prefill + decode logits equal the reference's over 320 tokens, and
greedy generation through the engine and through the HTTP server equals fla's greedy loop."""

import json

import httpx
import pytest
import torch

import models
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.params import SamplingParams
from mckernels import interpreted
from mckernels.fla_baseline import keep_first_autotune_configs
from tests.reference_helpers import VOCAB, path_errors, reference_pair, save_reference, served_text, tokens

fla_models = pytest.importorskip("fla.models", reason="flash-linear-attention is not installed")
if interpreted():
    keep_first_autotune_configs()

CONFIGS = {
    "plain": dict(hidden_size=64, num_heads=2, head_dim=16, expand_v=2.0, intermediate_size=96),
    "gva": dict(hidden_size=48, num_heads=2, num_v_heads=4, head_dim=12, expand_v=1.5, intermediate_size=80,
                conv_size=3),
    "odd": dict(hidden_size=40, num_heads=3, head_dim=10, expand_v=1.0, intermediate_size=72,
                output_gate_activation="sigmoid", allow_neg_eigval=True, tie_word_embeddings=True),
}
TOL = 1e-4


def reference_model(name, seed=0):
    torch.manual_seed(seed)
    config = fla_models.GatedDeltaNetConfig(
        vocab_size=VOCAB, num_hidden_layers=2, attn_mode="fused_recurrent", fuse_norm=False, fuse_swiglu=False,
        fuse_cross_entropy=False, norm_eps=1e-6, eos_token_id=256, bos_token_id=256, pad_token_id=256,
        **CONFIGS[name])
    model = fla_models.GatedDeltaNetForCausalLM(config).float().eval()
    with torch.no_grad():  # away from the initial values, so every parameter is exercised
        for pname, p in model.named_parameters():
            if pname.endswith(("norm.weight",)):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif pname.endswith(("A_log", "dt_bias")):
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3 if "conv1d" in pname else 0.08)
    return model


pair = reference_pair(lambda name: reference_model(name), CONFIGS, "gdn-tiny")


@torch.no_grad()
def greedy(reference, prompt, n):
    """fla's greedy loop, one token at a time through its recurrent cache. (Written out: fla
    0.6.0's `generate` under transformers 5 drops the cache between steps.)"""
    out = reference(torch.tensor([prompt]), use_cache=True)
    chosen = [int(out.logits[0, -1].argmax())]
    while len(chosen) < n:
        out = reference(torch.tensor([[chosen[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        chosen.append(int(out.logits[0, -1].argmax()))
    return chosen


def test_the_config_and_tensors_map_onto_mcserve(pair):
    name, reference, model, _ = pair
    c, ref = model.config, reference.config
    assert (c.arch, c.memory, c.mlp) == ("gated_deltanet", "delta", "swiglu")
    assert (c.n_heads, c.n_groups, c.dk) == (ref.num_v_heads or ref.num_heads, ref.num_heads, ref.head_dim)
    ours = sum(p.numel() for p in model.parameters())
    theirs = sum(p.numel() for p in reference.parameters())
    assert ours == theirs


def test_logits_equal_the_reference_on_every_path(pair):
    name, reference, model, _ = pair
    errors = path_errors(reference, model)
    assert max(errors.values()) < TOL, errors


def test_engine_greedy_equals_the_references_greedy_loop(pair):
    name, reference, model, _ = pair
    prompts = [tokens(n, seed=n)[0].tolist() for n in (5, 70)]
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, num_device_blocks=32, max_prefill_chunk=48))
    got = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    for prompt, ours in zip(prompts, got):
        assert ours == greedy(reference, prompt, 12)


def test_greedy_through_the_http_server_equals_the_reference(tmp_path):
    from tests.server_helpers import running_server
    reference = reference_model("gva")
    directory = save_reference(reference, tmp_path / "gdn-tiny")
    model = models.load(directory)
    prompt = tokens(40, seed=7)[0].tolist()
    text = served_text(model.tokenizer, greedy(reference, prompt, 12))
    with running_server(directory, tmp_path / "sessions") as (url, _):
        body = {"model": "gdn-tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        answer = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == text


def test_what_cannot_be_honoured_is_a_one_line_error(tmp_path):
    broken = save_reference(reference_model("plain"), tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    for change, message in [({"use_gate": False}, "use_gate"), ({"use_short_conv": False}, "use_short_conv"),
                            ({"attn": {"layers": [1], "num_heads": 2}}, "attention layers"),
                            ({"hidden_act": "powlu"}, "hidden_act")]:
        (broken / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(models.ModelLoadError, match=message) as err:
            models.load(broken)
        assert "\n" not in str(err.value)
