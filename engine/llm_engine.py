"""LLMEngine: the synchronous engine loop. `add_request`, then `step()` until done.

One step: the scheduler plans (swaps, slot starts, prefill chunks, decode tokens), the
ModelRunner executes the plan on the pooled states, the sampler picks the next tokens, and
finished sequences hand back their slots and blocks.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from models import MCModel

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner
from .params import SamplingParams
from .sampler import Sample, make_generator, sample
from .scheduler import Scheduler, StepPlan
from .sequence import Sequence, SequenceStatus


class EngineError(ValueError):
    """A request the engine refuses (bad prompt, queue full); the message says why."""


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_reused_tokens: int
    logprobs: list[Sample] = field(default_factory=list)


class LLMEngine:
    def __init__(self, model: MCModel, config: EngineConfig | None = None):
        self.model = model
        self.config = config or EngineConfig()
        self.tokenizer = model.tokenizer
        self.runner = ModelRunner(model, self.config)
        self.scheduler = Scheduler(self.config, model.config.segment_size, model.config.caches_checkpoints)
        self.sequences: dict[str, Sequence] = {}
        self._generators: dict[str, torch.Generator | None] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._swapped_slots: dict[str, dict[str, torch.Tensor]] = {}
        self._ids = itertools.count()

    # --- requests --------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        if not prompt_ids:
            raise EngineError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise EngineError(f"prompt token ids must be in [0, {vocab})")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise EngineError(f"too many queued requests ({self.config.max_waiting})")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.sequences:
            raise EngineError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, list(prompt_ids), params)
        self.sequences[request_id] = seq
        self._generators[request_id] = make_generator(params, self.runner.device)
        if self.tokenizer is not None:
            self._detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, params.stop)
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> None:
        """Stop a request now; its slot and blocks are freed at once."""
        seq = self.sequences.get(request_id)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")
            self._forget(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # --- the loop --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        self._move_states(plan)
        sampled = self._execute(plan)
        self.scheduler.update_after_step(plan)
        return [self._emit(seq, logits) for seq, logits in sampled]

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Run prompts to completion; the generated ids of each, in order."""
        seqs = [self.add_request(p, params) for p in prompts]
        while self.has_unfinished():
            self.step()
        return [s.output_ids for s in seqs]

    def _move_states(self, plan: StepPlan) -> None:
        # Copies out of the device pools come first: their slots and blocks may be reused below.
        for seq, slot, pairs in plan.swap_out:
            self._swapped_slots[seq.request_id] = self.runner.read_slot(slot)
            self.runner.copy_blocks(pairs, "device", "host")
        for seq, pairs in plan.swap_in:
            self.runner.copy_blocks(pairs, "host", "device")
            self.runner.write_slot(seq.slot, self._swapped_slots.pop(seq.request_id))
        for slot, last_block in plan.slot_inits:
            self.runner.init_slot(slot, last_block)

    def _execute(self, plan: StepPlan) -> list[tuple[Sequence, torch.Tensor]]:
        sampled = []
        now = time.monotonic()
        for work in plan.prefills:
            work.seq.first_scheduled_time = work.seq.first_scheduled_time or now
            logits = self.runner.prefill(work.seq.slot, work.seq.block_table, work.start, work.tokens,
                                         work.new_blocks)
            if work.samples:
                sampled.append((work.seq, logits))
        if plan.decodes:
            for work in plan.decodes:
                work.seq.first_scheduled_time = work.seq.first_scheduled_time or now
            logits = self.runner.decode([d.seq.slot for d in plan.decodes],
                                        [d.seq.block_table for d in plan.decodes],
                                        [d.position for d in plan.decodes],
                                        [d.token for d in plan.decodes],
                                        [d.new_block for d in plan.decodes])
            # A decode step is also the last prompt token of a one-token remainder.
            sampled += [(d.seq, row) for d, row in zip(plan.decodes, logits)
                        if d.position == d.seq.num_tokens - 1]
        return sampled

    def _emit(self, seq: Sequence, logits: torch.Tensor) -> RequestOutput:
        params = seq.params
        choice = sample(logits, params, self._generators[seq.request_id], seq.prompt_ids, seq.output_ids)
        seq.first_token_time = seq.first_token_time or time.monotonic()
        reason = None
        new_ids, text = [choice.token], ""
        if choice.token in params.stop_token_ids and not params.ignore_eos:
            reason, new_ids = "stop", []
        else:
            seq.output_ids.append(choice.token)
            detok = self._detokenizers.get(seq.request_id)
            if detok is not None:
                text = detok.add(choice.token)
                if detok.stopped:
                    reason = "stop"
            if reason is None and len(seq.output_ids) >= params.max_tokens:
                reason = "length"
        if reason is not None:
            detok = self._detokenizers.get(seq.request_id)
            if detok is not None and not detok.stopped:
                text += detok.finish()
            self.scheduler.finish(seq, reason)
            self._forget(seq)
        return RequestOutput(seq.request_id, new_ids, text, reason is not None, reason,
                             len(seq.prompt_ids), len(seq.output_ids), seq.num_reused_tokens,
                             [choice] if params.logprobs is not None else [])

    def _forget(self, seq: Sequence) -> None:
        self.sequences.pop(seq.request_id, None)
        self._generators.pop(seq.request_id, None)
        self._detokenizers.pop(seq.request_id, None)
        self._swapped_slots.pop(seq.request_id, None)

    # --- introspection ---------------------------------------------------------------------
    def pool_usage(self) -> dict[str, int]:
        pool = self.scheduler.pool
        return {"device_used": pool.device.num_used, "device_cached": pool.device.num_cached,
                "host_used": pool["host"].num_used, "free_slots": len(self.scheduler.free_slots),
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "swapped": len(self.scheduler.swapped)}


__all__ = ["LLMEngine", "RequestOutput", "EngineError", "SequenceStatus"]
