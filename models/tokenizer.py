"""Tokenizer and chat template: a thin wrapper over HuggingFace `tokenizers` and Jinja2."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = ["<|endoftext|>", IM_START, IM_END]

# ChatML, as used by Qwen and many others.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """Encode/decode text and render chats; `eos_ids` are the tokens that end a generation."""

    def __init__(self, hf: HFTokenizer, chat_template: str | None = None,
                 special_tokens: dict[str, str | None] | None = None, eos_ids: list[int] | None = None):
        """`special_tokens` (bos_token, eos_token) are given to the chat template, as transformers
        does; `eos_ids` end a generation (by default: <|endoftext|>, <|im_end|> and eos_token)."""
        self.hf = hf
        self.chat_template = chat_template or CHATML_TEMPLATE
        self._template = _compile(self.chat_template)
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        names = ("<|endoftext|>", IM_END, self.special_tokens.get("eos_token"))
        named = {i for t in names if t is not None and (i := hf.token_to_id(t)) is not None}
        self.eos_ids = sorted(named | set(eos_ids or ()))

    @classmethod
    def from_file(cls, path: str | Path, chat_template: str | None = None, **options) -> "Tokenizer":
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None
        return cls(hf, chat_template, **options)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     raise_exception=_raise, **self.special_tokens)

    def save(self, directory: Path) -> None:
        self.hf.save(str(directory / "tokenizer.json"))
        (directory / "chat_template.jinja").write_text(self.chat_template)


def byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer with no merges (256 bytes + the ChatML specials); for tests and
    for training a tokenizer-free baseline."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(SPECIAL_TOKENS)
    return Tokenizer(hf)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) with the ChatML special tokens."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise TokenizerError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} for a byte-level BPE")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(texts, trainer)
    return Tokenizer(hf)


def _raise(message: str):
    """`raise_exception` of transformers' chat templates (a template refusing its input)."""
    raise TokenizerError(f"the chat template refused the messages: {message}")


def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template is not valid Jinja: {e}") from None
