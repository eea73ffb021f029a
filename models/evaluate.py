"""Score models on held-out documents at several context lengths (a script, not a test).

    python -m models.evaluate MODEL_DIR [MODEL_DIR ...] --data a.txt b.txt --lengths 512 2048 8192

The held-out documents are chosen exactly as `mcserve train` chose them (same files, fraction and
seed), so the scores are on text no model was trained on. For each length L, every held-out
document with more than L tokens is cut into non-overlapping windows of L + 1 tokens; each window
is read from an empty state (prefill in pieces, so memory stays flat) and scored on its L
next-token predictions. Reported: mean loss (nats/token) over all positions, and over the second
half of each window, where a model that uses long context should gain most.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from . import io
from .config import parse_setting
from .data import read_documents, validation_indices
from .model import MCModel


def windows(doc_ids: list[list[int]], length: int) -> list[torch.Tensor]:
    out = []
    for ids in doc_ids:
        for start in range(0, len(ids) - length, length + 1):
            out.append(torch.tensor(ids[start:start + length + 1]))
    return out


@torch.no_grad()
def window_losses(model: MCModel, window: torch.Tensor, piece: int = 1024) -> torch.Tensor:
    """Per-position next-token loss [L] of one window of L + 1 tokens."""
    state = model.new_state(1)
    inputs, targets = window[None, :-1], window[1:]
    losses = []
    for start in range(0, inputs.shape[1], piece):
        logits = model.prefill(inputs[:, start:start + piece], state)[0]
        losses.append(F.cross_entropy(logits, targets[start:start + piece], reduction="none"))
    return torch.cat(losses)


def evaluate(model: MCModel, docs: list[str], lengths: list[int]) -> list[dict]:
    doc_ids = [model.tokenizer.encode(d) for d in docs]
    rows = []
    for length in lengths:
        ws = windows(doc_ids, length)
        if not ws:
            rows.append({"length": length, "windows": 0})
            continue
        per_pos = torch.stack([window_losses(model, w) for w in ws])  # [W, L]
        rows.append({"length": length, "windows": len(ws), "loss": per_pos.mean().item(),
                     "loss_second_half": per_pos[:, length // 2:].mean().item()})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model directories")
    parser.add_argument("--data", nargs="+", required=True, help="the training files, in training order")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--val-fraction", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a model config key set on load, for every model (e.g. aggregation=residual)")
    args = parser.parse_args(argv)
    overrides = dict(parse_setting(s) for s in args.set)
    docs = read_documents([Path(p) for p in args.data])
    held_out = [docs[i] for i in sorted(validation_indices(docs, args.val_fraction, args.seed))]
    print(f"# {len(held_out)} held-out documents")
    print("| model | aggregation | length | windows | loss (nats/token) | ppl | loss, 2nd half of window |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for path in args.models:
        model = io.load(path, overrides=overrides)
        for row in evaluate(model, held_out, args.lengths):
            if not row["windows"]:
                print(f"| {Path(path).name} | {model.config.aggregation} | {row['length']} | 0 | - | - | - |")
                continue
            print(f"| {Path(path).name} | {model.config.aggregation} | {row['length']} | {row['windows']} | "
                  f"{row['loss']:.4f} | {math.exp(row['loss']):.1f} | {row['loss_second_half']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
