"""Tokenizer and chat template: a thin wrapper over HuggingFace `tokenizers` and Jinja2."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = ["<|endoftext|>", IM_START, IM_END]

# ChatML, as used by Qwen and many others.
# ChatML, with tools rendered as Hermes / Qwen 2.5 do: their signatures in the system turn, calls
# as <tool_call> JSON in the assistant's, results as <tool_response> in a user turn. Without tools
# and tool messages it renders exactly as plain ChatML.
CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{ '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{%- for tool in tools %}{{ '\n' + (tool | tojson) }}{%- endfor %}"
    "{{ '\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant\n' + (message['content'] or '') }}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{{ ('\n' if (message['content'] or not loop.first) else '') + '<tool_call>\n{\"name\": \"' + fn['name'] "
    "+ '\", \"arguments\": ' + (fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson)) "
    "+ '}\n</tool_call>' }}"
    "{%- endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
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
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None
        return cls(hf, chat_template, **options)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; the tokenizer's own special tokens (a BOS) only if asked: chat
        templates write theirs, and the generation endpoints read prompts as they are."""
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> str:
        """The conversation as the model reads it; `tools` (OpenAI's function tools) go to the
        template as transformers gives them."""
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     tools=tools or None, raise_exception=_raise, **self.special_tokens)

    @property
    def renders_tools(self) -> bool:
        """The template shows tools to the model and expects Hermes-style <tool_call> answers."""
        return "<tool_call>" in self.chat_template

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


def _tojson(value, indent=None, ensure_ascii=False) -> str:
    """transformers' `tojson` for chat templates: plain JSON, keys in their order, nothing escaped
    for HTML (Jinja's own sorts keys and returns markup that escapes what it is added to)."""
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template is not valid Jinja: {e}") from None
