"""The MC language model: embeddings, blocks of (MC mixer, SwiGLU), the LM head.

Public paths (all over the same weights, and tested to agree):
    model.forward(tokens)              parallel/chunked, batched, differentiable
    model.naive_forward(tokens)        token loop straight from the equations
    state = model.new_state(batch)
    model.prefill(tokens, state)       chunked, from any state; updates it
    model.decode(tokens, state)        one token per sequence; updates it
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from .config import ModelConfig
from .gated_deltanet import GatedDeltaNetMixer
from .layers import RMSNorm, SwiGLU
from .mamba2 import Mamba2Mixer
from .mixer import MCMixer
from .state import MCState, StateError

MIXERS = {"mcserve": MCMixer, "mamba2": Mamba2Mixer, "gated_deltanet": GatedDeltaNetMixer}


class Block(nn.Module):
    """Pre-norm residual: the mixer, then (unless `mlp` is "none", as in Mamba2) a SwiGLU."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = MIXERS[config.arch](config)
        if config.mlp == "swiglu":
            self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
            self.mlp = SwiGLU(config.d_model, config.mlp_hidden)
        else:
            self.mlp_norm = self.mlp = None

    def forward(self, x: torch.Tensor, mix) -> torch.Tensor:
        x = x + mix(self.mixer, self.mixer_norm(x))
        return x if self.mlp is None else x + self.mlp(self.mlp_norm(x))


class MCModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tokenizer = None  # set by models.load / the trainer (models.tokenizer.Tokenizer)
        self.source = "mcserve"  # what the weights were loaded as (models.load: e.g. "Mamba2ForCausalLM")
        self._fingerprint: str | None = None
        self._init_weights()

    def _init_weights(self) -> None:
        out_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, out_std)
            elif p.dim() == 2 and "decay" not in name and "conv" not in name:
                nn.init.normal_(p, 0.0, 0.02)

    # --- public paths ----------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B,T] -> logits [B,T,V], from an empty state (training, scoring)."""
        return self.logits(self.features(tokens))

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B,T] -> the final normed hidden states [B,T,d], from an empty state. Training
        on a task that scores few positions projects only those (`logits`)."""
        state = self.new_state(self._batch(tokens))
        return self._hidden(tokens, lambda i, mixer, x: mixer.chunked(x, state.layers[i], 0))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., d] -> logits [..., V] (the LM head)."""
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return (features @ head.t()).float()

    def naive_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B,T] -> logits [B,T,V] by the reference token loop."""
        self._batch(tokens)
        return self.run_layers(tokens, lambda i, mixer, x: mixer.naive(x))

    def new_state(self, batch: int) -> MCState:
        device = self.embed.weight.device
        return MCState([blk.mixer.new_state(batch, device) for blk in self.blocks])

    def prefill(self, tokens: torch.Tensor, state: MCState) -> torch.Tensor:
        """tokens [B,T] -> logits [B,T,V]; continues `state` from its position and advances it."""
        self._check_batch(tokens, state)
        pos = state.num_tokens
        logits = self.run_layers(tokens, lambda i, mixer, x: mixer.chunked(x, state.layers[i], pos))
        state.num_tokens += tokens.shape[1]
        return logits

    def decode(self, tokens: torch.Tensor, state: MCState) -> torch.Tensor:
        """One token per sequence, tokens [B] or [B,1] -> logits [B,V]; advances `state`."""
        if tokens.dim() == 1:
            tokens = tokens[:, None]
        if tokens.dim() != 2 or tokens.shape[1] != 1:
            raise ValueError(f"decode takes one token per sequence, got shape {tuple(tokens.shape)}")
        self._check_batch(tokens, state)
        pos = state.num_tokens
        logits = self.run_layers(tokens, lambda i, mixer, x: mixer.step(x, state.layers[i], pos))
        state.num_tokens += 1
        return logits[:, 0]

    def rewind(self, state: MCState, n_checkpoints: int) -> MCState:
        """A new state at the end of segment `n_checkpoints` of `state`, rebuilt from its
        checkpoints alone (0 gives the empty state). Continuing it equals continuing the
        original sequence from that position."""
        if not 0 <= n_checkpoints <= state.num_checkpoints:
            raise ValueError(f"cannot rewind to checkpoint {n_checkpoints}: the state has {state.num_checkpoints}")
        fresh = self.new_state(state.batch_size)
        if n_checkpoints == 0:
            return fresh
        last = n_checkpoints - 1
        for old, new, block in zip(state.layers, fresh.layers, self.blocks):
            new.ckpts = old.ckpts[:, :, :n_checkpoints].clone()
            new.summaries = old.summaries[:, :, :n_checkpoints].clone()
            new.online = block.mixer.restart_online(old.ckpts[:, :, last])
            if old.ckpt_conv is not None:
                new.ckpt_conv = old.ckpt_conv[:, :n_checkpoints].clone()
                new.conv_tail = old.ckpt_conv[:, last].clone()
        fresh.num_tokens = n_checkpoints * self.config.segment_size
        return fresh

    # --- identity --------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """sha256 of the config and every weight (name, dtype, shape, bytes); cached."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.config.to_json().encode())
            for name, tensor in sorted(self.state_dict().items()):
                t = tensor.detach().contiguous().cpu()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    def invalidate_fingerprint(self) -> None:
        """Call after changing weights (the trainer does)."""
        self._fingerprint = None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def mc_parameters(self) -> dict[str, slice | None]:
        """What Memory Caching adds to the model (each mixer's `mc_parameters`, by full name)."""
        return {f"blocks.{i}.mixer.{name}": rows for i, block in enumerate(self.blocks)
                for name, rows in block.mixer.mc_parameters().items()}

    def init_from(self, source: "MCModel") -> list[str]:
        """Take every weight `source` has (a model of the same architecture, perhaps without what
        MC adds: a `none` model, an imported checkpoint). Only what MC adds may be new: a whole
        parameter (u_proj), or the MC rows of one (in_proj's u rows, after the source's). Returns
        the names that are new here."""
        theirs, new, mc = source.state_dict(), [], self.mc_parameters()
        with torch.no_grad():
            for name, tensor in self.state_dict().items():
                other, rows = theirs.get(name), mc.get(name, "not mc")
                if other is not None and other.shape == tensor.shape:
                    tensor.copy_(other)
                elif other is not None and isinstance(rows, slice) and other.shape[1:] == tensor.shape[1:] \
                        and other.shape[0] == (rows.start or 0):
                    tensor[:other.shape[0]] = other
                    new.append(f"{name}[{other.shape[0]}:]")
                elif other is None and rows is None:
                    new.append(name)
                else:
                    got = "nothing" if other is None else tuple(other.shape)
                    raise ValueError(f"cannot initialise {name} {tuple(tensor.shape)} from {got}: only what "
                                     "Memory Caching adds may differ from the source model")
        unused = sorted(set(theirs) - set(self.state_dict()))
        if unused:
            raise ValueError(f"the source model has weights this config does not use: {unused[:3]}")
        self.invalidate_fingerprint()
        return new

    def save_state(self, state: MCState, path) -> None:
        state.save(path, fingerprint=self.fingerprint)

    def load_state(self, path) -> MCState:
        """Load a state saved by `save_state` for this very model (checked by fingerprint)."""
        state = MCState.load(path, fingerprint=self.fingerprint, device=self.embed.weight.device)
        self.check_state(state)
        return state

    def check_state(self, state: MCState) -> None:
        expected = self.new_state(state.batch_size)
        if len(state.layers) != len(expected.layers):
            raise StateError(f"state has {len(state.layers)} layers, model has {len(expected.layers)}")
        for i, (got, want) in enumerate(zip(state.layers, expected.layers)):
            for name, ref in want.tensors().items():
                t = got.tensors().get(name)
                growing = {"ckpts": 2, "summaries": 2, "ckpt_conv": 1}.get(name)  # the checkpoint axis
                shape_ok = t is not None and t.dim() == ref.dim() and all(
                    a == b for j, (a, b) in enumerate(zip(t.shape, ref.shape)) if j != growing)
                if not shape_ok:
                    raise StateError(f"state layer {i} tensor {name!r} has shape "
                                     f"{None if t is None else tuple(t.shape)}, expected {tuple(ref.shape)}")

    # --- internals -------------------------------------------------------------------------
    def run_layers(self, tokens: torch.Tensor, mix, at: torch.Tensor | None = None) -> torch.Tensor:
        """Embed, run every block with `mix(layer_index, mixer, x)` as its mixer call, and project
        to logits [B,T,V]; with `at` [B], only row b's position at[b] is projected ([B,V]: a
        prefill samples from its last token alone).
        The three paths differ only in `mix`; the engine passes its own (pooled states). Token ids
        are not checked here (the per-step path): callers check them once."""
        hidden = self._hidden(tokens, mix)
        if at is not None:
            hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), at]
        return self.logits(hidden)

    def _hidden(self, tokens: torch.Tensor, mix) -> torch.Tensor:
        """`run_layers` up to the LM head: the final normed hidden states [B,T,d]."""
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, lambda mixer, h: mix(i, mixer, h))
        return self.norm(x)

    def _batch(self, tokens: torch.Tensor) -> int:
        """Check a [batch, time] tensor of token ids; its batch size."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape [batch, time], got {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        return tokens.shape[0]

    def _check_batch(self, tokens: torch.Tensor, state: MCState) -> None:
        if self._batch(tokens) != state.batch_size:
            raise ValueError(f"tokens have batch {tokens.shape[0]}, state has batch {state.batch_size}")
