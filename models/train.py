"""Training an MC model on text files (`mcserve train`).

AdamW with linear warm-up and cosine decay, gradient clipping, fp32 or bf16 autocast,
periodic validation, and checkpoints that resume exactly: the batch of step `s` is drawn from a
generator seeded by (seed, s), so a resumed run sees the same data as an uninterrupted one.

With `init_from` a run starts from a saved model (mcserve's, or an imported checkpoint) and its
tokenizer; `model` then changes keys on top of its config (aggregation=grm adds the connector u).
`train_only="mc"` freezes every weight but what Memory Caching adds (`MCModel.mc_parameters`):
Memory Caching on a pretrained model.

Output directory: a loadable model (config.json, model.safetensors, tokenizer.json,
chat_template.jinja), `train_state.pt` (optimizer and step), `train_log.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import io
from .config import ConfigError, ModelConfig
from .data import TokenSplit, read_documents, sample_batch, tokenize_split
from .model import MCModel
from .optim import adamw, cosine_lr, set_lr
from .tokenizer import Tokenizer, train_bpe

TRAIN_STATE = "train_state.pt"
TRAIN_LOG = "train_log.jsonl"


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    model: dict = field(default_factory=dict)   # ModelConfig keys; vocab_size comes from the tokenizer
    tokenizer: str | None = None                # an existing tokenizer.json; else BPE is trained
    vocab_size: int = 4096                      # for a trained tokenizer
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dtype: str = "fp32"
    val_fraction: float = 0.02
    val_every: int = 200
    val_batches: int = 8
    ckpt_every: int = 200
    seed: int = 0
    device: str = "auto"
    init_from: str | None = None                # a model directory to start from (its tokenizer too)
    train_only: str = "all"                     # "all", or "mc": only what Memory Caching adds

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "seq_len", "val_every", "val_batches", "ckpt_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train option '{name}' must be >= 1, got {getattr(self, name)}")
        if not self.data:
            raise ConfigError("train option 'data' needs at least one text file")
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"train option 'dtype' must be one of ['fp32', 'bf16'], got {self.dtype!r}")
        if not (0.0 <= self.val_fraction < 0.5):
            raise ConfigError(f"train option 'val_fraction' must be in [0, 0.5), got {self.val_fraction}")
        if self.lr <= 0 or not (0 <= self.min_lr_ratio <= 1) or self.warmup < 0 or self.grad_clip <= 0:
            raise ConfigError("train options need lr > 0, 0 <= min_lr_ratio <= 1, warmup >= 0, grad_clip > 0")
        if self.train_only not in ("all", "mc"):
            raise ConfigError(f"train option 'train_only' must be 'all' or 'mc', got {self.train_only!r}")
        if self.train_only == "mc" and not self.init_from:
            raise ConfigError("train option train_only=mc needs init_from (the model whose weights stay frozen)")
        if self.init_from and self.tokenizer:
            raise ConfigError("train options init_from and tokenizer exclude each other (the model brings its own)")
        if not self.init_from:
            ModelConfig.from_dict({**self.model, "vocab_size": 512})  # reject bad model keys early


def lr_at(step: int, cfg: TrainConfig) -> float:
    return cosine_lr(step, cfg.lr, cfg.steps, cfg.warmup, cfg.min_lr_ratio)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, log=print):
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        self.device = pick_device(cfg.device)
        self.out.mkdir(parents=True, exist_ok=True)
        self.step = 0
        if resume:
            self._resume()
        elif cfg.init_from:
            self._start_from(cfg.init_from)
        else:
            self.tokenizer = (Tokenizer.from_file(cfg.tokenizer) if cfg.tokenizer else None)
            docs = read_documents([Path(p) for p in cfg.data])
            if self.tokenizer is None:
                log(f"training a {cfg.vocab_size}-token BPE tokenizer on {len(docs)} documents")
                self.tokenizer = train_bpe(docs, cfg.vocab_size)
            torch.manual_seed(cfg.seed)
            self.model = MCModel(ModelConfig.from_dict({**cfg.model, "vocab_size": self.tokenizer.vocab_size}))
            self.model.tokenizer = self.tokenizer
            self._docs = docs
        self.model.to(self.device)
        self.tokenizer.save(self.out)  # at once, so a sibling run can share it
        self.split = self._tokenize()
        self.optimizer = self._make_optimizer()
        if resume:
            self.optimizer.load_state_dict(self._resume_state["optimizer"])

    # --- setup -----------------------------------------------------------------------------
    def _resume(self) -> None:
        file = self.out / TRAIN_STATE
        if not file.is_file():
            raise FileNotFoundError(f"nothing to resume: {file} not found")
        state = torch.load(file, map_location="cpu", weights_only=False)
        saved_cfg = TrainConfig(**state["train_config"])
        # Only the length of the run may change on resume; the rest must match.
        self.cfg = dataclasses.replace(saved_cfg, steps=self.cfg.steps, out=self.cfg.out)
        # Weights come from train_state.pt (written in one atomic replace with the optimizer).
        self.model = io.load(self.out)
        self.model.load_state_dict(state["model"])
        self.model.invalidate_fingerprint()
        self.tokenizer = self.model.tokenizer
        self.step = state["step"]
        self._docs = read_documents([Path(p) for p in self.cfg.data])
        self._resume_state = state
        self.log(f"resuming {self.out} at step {self.step}")

    def _start_from(self, directory: str) -> None:
        source = io.load(directory)
        torch.manual_seed(self.cfg.seed)
        self.model = MCModel(ModelConfig.from_dict({**source.config.to_dict(), **self.cfg.model}))
        new = self.model.init_from(source)
        self.tokenizer = self.model.tokenizer = source.tokenizer
        self._docs = read_documents([Path(p) for p in self.cfg.data])
        self.log(f"starting from {directory}; new: {new or 'nothing'}")

    def _tokenize(self) -> TokenSplit:
        split = tokenize_split(self._docs, self.tokenizer, self.cfg.val_fraction, self.cfg.seed)
        self.log(f"data: {split.train.numel():,} train tokens, {split.val.numel():,} validation tokens "
                 f"in {len(split.val_documents)} documents")
        return split

    def _make_optimizer(self) -> torch.optim.Optimizer:
        if self.cfg.train_only == "all":
            return adamw(self.model, self.cfg.lr, self.cfg.weight_decay)
        return self._mc_only_optimizer()

    def _mc_only_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over what MC adds; everything else frozen. A parameter that is MC's only in
        some rows (mcserve's in_proj, whose last rows are u) has the other rows' gradients
        zeroed and no weight decay, so those rows never move."""
        mc = self.model.mc_parameters()
        if not mc:
            raise ConfigError(f"aggregation {self.model.config.aggregation!r} adds no parameters to train "
                              "(train_only=mc needs grm, soup or ssc; residual needs no training)")
        params = dict(self.model.named_parameters())
        for p in params.values():
            p.requires_grad_(False)
        whole, partial = [], []
        for name, rows in mc.items():
            p = params[name].requires_grad_(True)
            if rows is None:
                whole.append(p)
                continue
            mask = torch.zeros(p.shape[0], 1, device=p.device, dtype=p.dtype)
            mask[rows] = 1
            p.register_hook(lambda grad, mask=mask: grad * mask)
            partial.append(p)
        trained = sum(p.numel() for p in whole) + sum(int(p[rows].numel()) for name, rows in mc.items()
                                                       if rows is not None for p in [params[name]])
        self.log(f"training only what MC adds: {trained:,} of {self.model.num_parameters():,} parameters")
        groups = [{"params": whole, "weight_decay": self.cfg.weight_decay}, {"params": partial, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.cfg.lr, betas=(0.9, 0.95), eps=1e-8)

    # --- the loop --------------------------------------------------------------------------
    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.dtype == "bf16"):
            logits = self.model(batch[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    def batch_for(self, step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        return sample_batch(self.split.train, self.cfg.batch_size, self.cfg.seq_len, generator)

    @torch.no_grad()
    def validate(self) -> float | None:
        if self.split.val.numel() < self.cfg.seq_len + 2:
            return None
        self.model.eval()
        generator = torch.Generator().manual_seed(12345)
        losses = [self.loss(sample_batch(self.split.val, self.cfg.batch_size, self.cfg.seq_len, generator)).item()
                  for _ in range(self.cfg.val_batches)]
        self.model.train()
        return sum(losses) / len(losses)

    def train(self, stop_at: int | None = None) -> dict:
        """Run to `cfg.steps` (or stop early at `stop_at`, as an interrupted run would)."""
        cfg = self.cfg
        last = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
        self.model.train()
        tokens_per_step = cfg.batch_size * cfg.seq_len
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=os.environ.get("MCSERVE_NO_PROGRESS") == "1")
        started, first_step, last_val = time.perf_counter(), self.step, None
        while self.step < last:
            set_lr(self.optimizer, lr_at(self.step, cfg))
            loss = self.loss(self.batch_for(self.step))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.step += 1
            rate = (self.step - first_step) * tokens_per_step / (time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:,.0f}")
            self._log({"step": self.step, "loss": loss.item(), "lr": lr_at(self.step - 1, cfg),
                       "grad_norm": grad_norm.item(), "tokens_per_s": rate})
            if self.step % cfg.val_every == 0 or self.step == cfg.steps:
                last_val = self.validate()
                self._log({"step": self.step, "val_loss": last_val})
                bar.write(f"step {self.step}: train loss {loss.item():.4f}, val loss {last_val}")
            if self.step % cfg.ckpt_every == 0 or self.step == last:
                self.save()
        bar.close()
        return {"steps": self.step, "val_loss": last_val, "parameters": self.model.num_parameters()}

    def save(self) -> None:
        """Write the model and the optimizer state; each file replaced atomically."""
        self.model.invalidate_fingerprint()
        tmp = self.out / ".saving"
        io.save(self.model, tmp)
        torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(), "model": self.model.state_dict(),
                    "train_config": dataclasses.asdict(self.cfg)}, tmp / TRAIN_STATE)
        for file in tmp.iterdir():
            os.replace(file, self.out / file.name)
        tmp.rmdir()

    def _log(self, record: dict) -> None:
        with open(self.out / TRAIN_LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
