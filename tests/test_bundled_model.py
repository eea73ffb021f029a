"""The bundled default model: loads, has the recorded fingerprint, generates deterministically."""

import re

import models
from engine.generate import generate_ids
from engine.params import SamplingParams


def recorded_fingerprint() -> str:
    readme = (models.default_model_path() / "README.md").read_text()
    return re.search(r"Fingerprint .*?: `([0-9a-f]{32})`", readme).group(1)


def test_bundled_model_loads_with_its_recorded_fingerprint():
    model = models.load(models.default_model_path())
    assert model.fingerprint == recorded_fingerprint()  # weights intact, config unchanged
    assert models.load(models.default_model_path()).fingerprint == model.fingerprint
    c = model.config
    assert (c.memory, c.aggregation) == ("gla", "grm") and 64 <= c.segment_size <= 128
    assert 5e6 <= model.num_parameters() <= 10e6
    tok = model.tokenizer
    assert tok.vocab_size == c.vocab_size == 4096
    assert tok.hf.token_to_id("<|im_start|>") is not None and tok.hf.token_to_id("<|im_end|>") is not None


def test_bundled_model_greedy_generation_is_deterministic():
    model = models.load(models.default_model_path())
    ids = model.tokenizer.encode("Fellow-Citizens of the Senate and House of Representatives:")
    params = SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=tuple(model.tokenizer.eos_ids))
    first = list(generate_ids(model, ids, params))
    assert len(first) > 0 and first == list(generate_ids(model, ids, params))
    text = model.tokenizer.decode(first)
    assert sum(ch.isalpha() for ch in text) > len(text) / 2  # it writes words, not noise
