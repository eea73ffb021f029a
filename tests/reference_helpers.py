"""What the tests against reference libraries share: saving a reference model as the library
does (with a byte tokenizer and a chat template), token ids, mcserve's three paths over them,
and the text the server sends for generated ids."""

from __future__ import annotations

import json

import torch

import models
from models.tokenizer import CHATML_TEMPLATE

VOCAB = 300  # the byte tokenizer's 259 tokens, and some never produced


def save_reference(model, directory):
    """`save_pretrained`, plus a tokenizer.json and a tokenizer_config.json as a hub model has."""
    model.save_pretrained(directory)
    models.byte_tokenizer().hf.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE}))
    return directory


def reference_pair(make, configs, directory_name):
    """A module-scoped fixture over `configs`: (name, reference model, mcserve's load of it, its directory)."""
    import pytest

    @pytest.fixture(scope="module", params=sorted(configs))
    def pair(request, tmp_path_factory):
        reference = make(request.param)
        directory = save_reference(reference, tmp_path_factory.mktemp(request.param) / directory_name)
        return request.param, reference, models.load(directory), directory
    return pair


def tokens(n=320, seed=1):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def mcserve_paths(model, ids, split=133) -> dict[str, torch.Tensor]:
    """Logits of mcserve's chunked and naive paths, and of a prefill of `split` tokens + decode."""
    state = model.new_state(1)
    stepped = [model.prefill(ids[:, :split], state)]
    stepped += [model.decode(ids[:, t], state)[:, None] for t in range(split, ids.shape[1])]
    return {"chunked": model(ids), "naive": model.naive_forward(ids), "prefill+decode": torch.cat(stepped, 1)}


@torch.no_grad()
def path_errors(reference, model, ids=None) -> dict[str, float]:
    """The largest |logit difference| of each of mcserve's paths against the reference's forward."""
    ids = tokens() if ids is None else ids
    want = reference(ids).logits.float()
    return {path: (got - want).abs().max().item() for path, got in mcserve_paths(model, ids).items()}


def served_text(tokenizer, ids):
    """The text the server sends for these generated ids (its incremental detokenizer, which
    holds back an unfinished UTF-8 sequence at the end)."""
    from engine.detokenizer import IncrementalDetokenizer
    detok = IncrementalDetokenizer(tokenizer, ())
    return "".join(detok.add(i) for i in ids) + detok.finish()
