"""Random-weight peers of mcserve's bundled model, for vLLM to serve side by side (issue 22, item 5).

    .peers/vllm/bin/python benchmarks/peers/make_models.py [--out .peers/models]

Run with the vLLM venv's python (it has transformers and torch). Writes two checkpoints of about the
bundled model's size, with mcserve's own tokenizer and chat template, so that every server sees the
same token counts:

- `llama`:  LlamaForCausalLM, vocab 4096, hidden 256, 6 layers, 4 heads, SwiGLU 704, tied (~5.9M);
- `mamba2`: Mamba2ForCausalLM, vocab 4096, hidden 256, 6 layers, expand 2, 8 heads of 64, 1 group,
  state 64, tied (~3.6M).

The weights are random (fixed seed): throughput and latency do not depend on what the weights say,
and the loads use `ignore_eos`, so every request generates its full length. Nothing is downloaded:
the configs are built here.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Mamba2Config, Mamba2ForCausalLM

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "models" / "weights" / "mc-gla-grm-small"
SEED = 0

# mcserve's ChatML specials (models/tokenizer.py): ids 0, 1, 2 of the bundled tokenizer.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VOCAB, HIDDEN, LAYERS = 4096, 256, 6
# 4,500-token prompts plus their output fit with room to spare.
MAX_POSITIONS = 8192


def special_ids() -> dict[str, int]:
    """The ids of the ChatML specials in the bundled tokenizer, checked to exist."""
    added = json.loads((BUNDLED / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in added}
    missing = {ENDOFTEXT, IM_START, IM_END} - ids.keys()
    if missing:
        raise SystemExit(f"the bundled tokenizer lacks {sorted(missing)}")
    return ids


def llama_config(ids: dict[str, int]) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=704, max_position_embeddings=MAX_POSITIONS,
                       tie_word_embeddings=True, bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END],
                       pad_token_id=ids[ENDOFTEXT])


def mamba2_config(ids: dict[str, int]) -> Mamba2Config:
    # expand 2 -> 512 inner channels = 8 heads of 64; one group and state 64 keep the in-projection
    # small (the parameter count lands near 3.6M) and are shapes vLLM's CPU Mamba2 ops take.
    return Mamba2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, expand=2, head_dim=64,
                        num_heads=8, n_groups=1, state_size=64, conv_kernel=4, chunk_size=256,
                        tie_word_embeddings=True, bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END],
                        pad_token_id=ids[ENDOFTEXT])


def tokenizer_config() -> dict:
    """transformers' tokenizer_config.json: mcserve's chat template, and specials that exist."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": (BUNDLED / "chat_template.jinja").read_text(),
        "bos_token": ENDOFTEXT, "eos_token": IM_END, "pad_token": ENDOFTEXT, "unk_token": None,
        # The bundled tokenizer adds no BOS (mcserve encodes chat prompts without one): the same here.
        "add_bos_token": False, "add_eos_token": False,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
    }


def save_tokenizer(out: Path) -> None:
    shutil.copyfile(BUNDLED / "tokenizer.json", out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    specials = {"bos_token": ENDOFTEXT, "eos_token": IM_END, "pad_token": ENDOFTEXT}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def save_peer(model: torch.nn.Module, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer(out)
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def check_tokenizer(out: Path) -> None:
    """Load the saved tokenizer back as vLLM will, and render a chat with it."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == f"{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n", repr(text)
    assert tok.eos_token_id == special_ids()[IM_END]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / ".peers" / "models"))
    args = parser.parse_args(argv)
    ids = special_ids()
    builders = {"llama": (LlamaForCausalLM, llama_config), "mamba2": (Mamba2ForCausalLM, mamba2_config)}
    for name, (model_class, make_config) in builders.items():
        torch.manual_seed(SEED)
        out = Path(args.out) / name
        count = save_peer(model_class(make_config(ids)).eval(), out)
        check_tokenizer(out)
        print(f"{name}: {model_class.__name__}, {count:,} parameters ({count / 1e6:.2f}M) -> {out}")


if __name__ == "__main__":
    main()
