"""Structured outputs: a request's constraint (JSON, a JSON schema, a regex, a choice, a Lark or
GBNF grammar) compiled by llguidance against the tokenizer, and one matcher per sequence that
says which tokens may come next.

llguidance, not xgrammar (benchmarks/grammar_engines.py, docs/benchmarks.md): xgrammar 0.2.9
lets raw control characters into JSON strings, which no JSON parser accepts, and one of 12 random
documents it allowed was not valid JSON; every one of llguidance's was. llguidance compiles a
schema in about 1 ms against xgrammar's 3-17 ms; its masks cost more (0.8 against 0.1 ms a step
at batch 32 on the bundled vocabulary), still small beside a decode step. Both fill masks on the
CPU; the sampler applies them on whatever device the logits are on.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .params import Constraint

FORMATS = {"json_object": "json_schema", "json_schema": "json_schema", "regex": "regex", "choice": "choice",
           "grammar": "grammar", "lark": "lark"}
COMPACT_JSON = {"whitespace_flexible": False}  # no runs of whitespace for a sampled model to loop in


class GrammarError(ValueError):
    """A constraint that cannot be compiled; the message says what is wrong with it."""


class Grammars:
    """Grammars for one tokenizer and model vocabulary; compiled constraints are cached."""

    CACHED = 256

    def __init__(self, tokenizer, vocab_size: int, overlap: bool = True):
        import llguidance
        import llguidance.torch
        self.llg, self.llg_torch = llguidance, llguidance.torch
        self.tokenizer = llguidance.LLTokenizer(tokenizer.hf.to_str(), n_vocab=vocab_size,
                                                eos_token=list(tokenizer.eos_ids))
        # Masks in parallel only where there are cores to spare: on a small machine the pool's
        # threads would take them from the model's own.
        self.executor = llguidance.LLExecutor() if (os.cpu_count() or 1) >= 8 else None
        self.vocab_size = vocab_size
        # Masks are filled beside the forward where a core is free for it (a GPU forward leaves
        # the CPU idle); on a CPU whose every core runs the model, a thread only adds a handoff.
        self._filler = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks") if overlap else None
        self._compiled: OrderedDict[Constraint, str] = OrderedDict()

    def compile(self, constraint: Constraint) -> str:
        """The constraint as an llguidance grammar, checked against the tokenizer."""
        grammar = self._compiled.get(constraint)
        if grammar is None:
            grammar = self._grammar(constraint)
            error = self.llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
            if error:
                raise GrammarError(f"cannot compile the {constraint.kind.replace('_', ' ')}: {first_line(error)}")
            self._compiled[constraint] = grammar
            while len(self._compiled) > self.CACHED:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(constraint)
        return grammar

    def _grammar(self, c: Constraint) -> str:
        what = c.kind.replace("_", " ")
        try:
            if c.kind in ("json_object", "json_schema"):
                schema = json.loads(c.spec) if c.kind == "json_schema" else {"type": "object"}
                if not isinstance(schema, dict):
                    raise GrammarError(f"cannot compile the {what}: a JSON schema is an object")
                return self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT_JSON)
            return self.llg.grammar_from(FORMATS[c.kind], c.spec)
        except (ValueError, TypeError) as e:
            if isinstance(e, GrammarError):
                raise
            raise GrammarError(f"cannot compile the {what}: {first_line(str(e))}") from None

    def fill_masks(self, matchers: list["Matcher"]) -> Future:
        """Start filling the tokens each matcher allows next, as one int32 bitmask [B, ceil(V/32)],
        on the grammar thread if there is one: llguidance drops the GIL, so the engine runs the
        step's forward meanwhile. The matchers must not move until the future is done."""
        states = [m.state for m in matchers]
        if self._filler is not None:
            return self._filler.submit(self._fill, states)
        done = Future()
        done.set_result(self._fill(states))
        return done

    def _fill(self, states: list) -> torch.Tensor:
        bitmask = self.llg_torch.allocate_token_bitmask(len(states), self.vocab_size)
        if self.executor is not None:
            self.llg_torch.fill_next_token_bitmask_par(self.executor, [(s, i) for i, s in enumerate(states)], bitmask)
        else:
            for i, state in enumerate(states):
                self.llg_torch.fill_next_token_bitmask(state, bitmask, i)
        return bitmask

    def matcher(self, grammar: str) -> "Matcher":
        state = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if state.is_error():
            raise GrammarError(first_line(state.get_error()))
        return Matcher(state, self)


@dataclass
class Matcher:
    """Where one sequence is in its grammar."""
    state: object
    grammars: Grammars

    def accept(self, token: int) -> bool:
        return self.state.consume_token(token)

    @property
    def done(self) -> bool:
        """Complete: nothing but the end of the output may follow."""
        return self.state.is_stopped()


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "invalid"


def banned_tokens(bitmask: torch.Tensor, vocab: int, device) -> torch.Tensor:
    """The tokens a filled bitmask refuses, bool [B, V] on `device`: moved once, unpacked once."""
    return ~unpack_bitmask(bitmask.to(device), vocab)


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 words [B, ceil(V/32)], bit j of word w = token 32w + j, to bool [B, V]."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab].bool()
