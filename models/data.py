"""Training data: text files -> documents -> one token stream, split into train and validation.

Documents are the paragraphs of the files (blank-line separated), short neighbours joined
into documents of at least `min_chars`, so a book becomes a run of passages and a speech on one
long line stays whole. A fixed fraction of *documents*
(not tokens) is held out, picked in a seeded-hash order until they hold that fraction of the
text, so validation documents are whole and long ones can be scored at long context.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .tokenizer import Tokenizer

EOT = "<|endoftext|>"


@dataclass
class TokenSplit:
    train: torch.Tensor        # 1-D int64 token stream, documents separated by EOT
    val: torch.Tensor
    val_documents: list[torch.Tensor]


def read_documents(files: list[Path], min_chars: int = 2000) -> list[str]:
    """Paragraphs (blank-line separated) of every file, neighbours joined up to `min_chars`."""
    docs = []
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"training file not found: {file}")
        text = file.read_text(encoding="utf-8", errors="replace")
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        docs += merge_short_documents(paragraphs, min_chars)
    if not docs:
        raise ValueError(f"no text found in {[str(f) for f in files]}")
    return docs


def merge_short_documents(paragraphs: list[str], min_chars: int) -> list[str]:
    """Books arrive as many short paragraphs: join neighbours until each has `min_chars`."""
    merged, buffer, size = [], [], 0
    for paragraph in paragraphs:
        buffer.append(paragraph)
        size += len(paragraph)
        if size >= min_chars:
            merged.append("\n\n".join(buffer))
            buffer, size = [], 0
    if buffer:
        merged.append("\n\n".join(buffer))
    return merged


def validation_indices(docs: list[str], fraction: float, seed: int) -> set[int]:
    """Whole documents, in a seeded-hash order, until they hold `fraction` of all characters."""
    if fraction <= 0:
        return set()
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha256(f"{seed}:{i}:{docs[i][:200]}".encode()).digest())
    budget, chosen = fraction * sum(len(d) for d in docs), set()
    for i in order:
        if budget <= 0:
            break
        chosen.add(i)
        budget -= len(docs[i])
    return chosen


def tokenize_split(docs: list[str], tokenizer: Tokenizer, val_fraction: float, seed: int) -> TokenSplit:
    eot = tokenizer.hf.token_to_id(EOT)
    if eot is None:
        raise ValueError(f"the tokenizer has no {EOT} token")
    held_out = validation_indices(docs, val_fraction, seed)
    train, val = [], []
    for i, enc in enumerate(tokenizer.hf.encode_batch(docs, add_special_tokens=False)):
        (val if i in held_out else train).append(torch.tensor(enc.ids + [eot], dtype=torch.int64))
    if not train:
        raise ValueError("every document went to validation; lower --val-fraction")
    empty = torch.zeros(0, dtype=torch.int64)
    return TokenSplit(torch.cat(train), torch.cat(val) if val else empty, val)


def sample_batch(stream: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` random windows of `seq_len + 1` tokens -> [batch, seq_len + 1]."""
    if stream.numel() < seq_len + 2:
        raise ValueError(f"only {stream.numel()} tokens of data, need more than {seq_len + 1}")
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch,), generator=generator)
    return torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])
