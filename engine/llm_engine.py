"""LLMEngine: the synchronous engine loop. `add_request`, then `step()` until done.

One step: the scheduler plans (swaps, slot starts, prefill chunks, decode tokens), the
ModelRunner executes the plan on the pooled states, the sampler picks the next tokens, and
finished sequences hand back their slots and blocks.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch

from models import MCModel

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .grammar import GrammarError, Grammars, Matcher, banned_tokens
from .host_memory import hold_freed_memory
from .model_runner import ModelRunner
from .packing import pack_by_length
from .params import SamplingParams
from .sampler import Sample, make_generator, sample
from .scheduler import Scheduler, StepPlan
from .sequence import Sequence, SequenceStatus
from .session_index import SessionError, check_session_id
from .sessions import SessionStore, stack_blocks
from .stats import TIERS, EngineStats

log = logging.getLogger("mcserve.engine")


class EngineError(ValueError):
    """A request the engine refuses (bad prompt, queue full); the message says why."""


class QueueFull(EngineError):
    """Too many requests are waiting; try again shortly."""


class ContextTooLong(EngineError):
    """The prompt plus max_tokens exceed `max_model_len`."""


class ConstraintError(EngineError):
    """A structured-output constraint that cannot be compiled, or a bad logit_bias."""


@dataclass
class RequestOutput:
    request_id: str
    group_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_reused_tokens: int
    logprobs: list[Sample] = field(default_factory=list)
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    resume_seconds: float | None = None
    # The session write of a finished turn, when the store is durable ("sync"): the output is
    # delivered to the client once it completes.
    persisted: Future | None = None


class LLMEngine:
    def __init__(self, model: MCModel, config: EngineConfig | None = None,
                 sessions: SessionStore | None = None):
        hold_freed_memory()
        self.model = model
        self.sessions = sessions
        self.tokenizer = model.tokenizer
        self.runner = ModelRunner(model, config or EngineConfig())
        self.config = self.runner.config  # with the checkpoint dtype resolved
        if self.config.compile_decode:
            self.runner.precompile_decode(lambda done, total: log.info(
                "compiling the decode step: %d of %d graphs", done, total))
        if sessions is not None:
            sessions.attach(model.fingerprint, self.config.ckpt_dtype, model.config.segment_size)
        self.scheduler = Scheduler(self.config, model.config.segment_size)
        self.sequences: dict[str, Sequence] = {}
        self._generators: dict[str, torch.Generator | None] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._swapped_slots: dict[str, dict[str, torch.Tensor]] = {}
        self._resume: dict[str, tuple] = {}  # request -> (saved SessionState, exact)
        self._active_sessions: dict[str, str] = {}  # session -> the request using it
        self._matchers: dict[str, Matcher] = {}  # request -> where its output is in its grammar
        self._grammars: Grammars | None = None   # built at the first constrained request
        self._ids = itertools.count()
        self._num_steps = 0

    # --- requests --------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    session_id: str | None = None, resume_from: str | None = None,
                    cache_salt: str = "") -> Sequence:
        """Queue a request. With `session_id`, the session's saved state is resumed: if its tokens
        are a prefix of the prompt only the rest is read; if the prompt diverges, reading restarts
        from the last checkpoint at or before the divergence. With `resume_from`, the state is read
        from that session and saved under `session_id` (a branch: the Responses API's
        `previous_response_id`). With `cache_salt`, cached prefixes are shared only with requests
        of the same salt (a tenant's). Raises EngineError, SessionError."""
        if not prompt_ids:
            raise EngineError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise EngineError(f"prompt token ids must be in [0, {vocab})")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFull(f"too many queued requests ({self.config.max_waiting})")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.sequences:
            raise EngineError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, list(prompt_ids), params, cache_salt=cache_salt)
        if not self.scheduler.fits(seq):
            raise ContextTooLong(
                f"this model's maximum context length is {self.max_model_len} tokens; the request asks for "
                f"{len(prompt_ids) + params.max_tokens} ({len(prompt_ids)} in the prompt, {params.max_tokens} "
                "in the completion): shorten the prompt or max_tokens")
        matcher = self._check_steering(params)
        generator = make_generator(params, self.runner.device)
        detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop) if self.tokenizer is not None else None
        if session_id is not None:  # last: nothing after it can fail and leave the session held
            self._attach_session(seq, session_id, resume_from or session_id)
        self.sequences[request_id] = seq
        self._generators[request_id] = generator
        if matcher is not None:
            self._matchers[request_id] = matcher
        if detokenizer is not None:
            self._detokenizers[request_id] = detokenizer
        self.scheduler.add(seq)
        return seq

    def _check_steering(self, params: SamplingParams) -> Matcher | None:
        """Check logit_bias against the vocabulary, and compile the constraint; its matcher."""
        vocab = self.model.config.vocab_size
        bad = [t for t, _ in params.logit_bias if not 0 <= t < vocab]
        if bad:
            raise ConstraintError(f"logit_bias token ids must be in [0, {vocab}), got {bad[0]}")
        if params.constraint is None:
            return None
        if self.tokenizer is None:
            raise ConstraintError("structured outputs need the model's tokenizer")
        if self._grammars is None:
            spare_core = self.runner.device.type != "cpu" or (os.cpu_count() or 1) > torch.get_num_threads()
            self._grammars = Grammars(self.tokenizer, vocab, overlap=spare_core)
        try:
            return self._grammars.matcher(self._grammars.compile(params.constraint))
        except GrammarError as e:
            raise ConstraintError(str(e)) from None

    def add_group(self, prompt_ids: list[int], params: SamplingParams, n: int,
                  request_id: str | None = None, cache_salt: str = "") -> list[Sequence]:
        """`n` samples of one prompt (OpenAI's `n`). The first reads the prompt; the others start
        once it has, sharing its prompt checkpoints and reading only the unfinished last segment.
        With a seed, sample i uses seed + i."""
        if not 1 <= n <= self.config.max_num_seqs:
            raise EngineError(f"n must be in [1, {self.config.max_num_seqs}], got {n}")
        group = request_id or f"req-{next(self._ids)}"
        if n == 1:
            return [self.add_request(prompt_ids, params, group, cache_salt=cache_salt)]
        seqs: list[Sequence] = []
        try:
            for i in range(n):
                sample_params = params if params.seed is None else replace(params, seed=params.seed + i)
                seq = self.add_request(prompt_ids, sample_params, f"{group}-{i}", cache_salt=cache_salt)
                seq.group_id, seq.index, seq.wait_for = group, i, (seqs[0] if seqs else None)
                seqs.append(seq)
        except EngineError:
            for seq in seqs:
                self.abort(seq.request_id)
            raise
        return seqs

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its slot and blocks are freed at once (a session keeps what was
        read). Returns its final output, or None if there is no such running request."""
        seq = self.sequences.get(request_id)
        if seq is None or seq.is_finished:
            return None
        persisted = self._end(seq, "abort")
        return RequestOutput(seq.request_id, seq.group_id, seq.index, [], "", True, "abort",
                             len(seq.prompt_ids), len(seq.output_ids), seq.num_reused_tokens, persisted=persisted)

    def abort_group(self, group_id: str) -> list[RequestOutput]:
        """Abort every sample of a request; their final outputs."""
        ids = [rid for rid, seq in self.sequences.items() if seq.group_id == group_id]
        return [out for rid in ids if (out := self.abort(rid)) is not None]

    # --- sessions --------------------------------------------------------------------------
    def _attach_session(self, seq: Sequence, session_id: str, source_id: str) -> None:
        if self.sessions is None:
            raise EngineError("sessions are not enabled on this engine")
        check_session_id(session_id)
        if session_id in self._active_sessions:
            raise SessionError(f"session {session_id!r} is busy with another request", "busy")
        self.sessions.acquire(session_id)  # the store's lease: no other replica advances it meanwhile
        started = time.monotonic()
        try:
            saved = self.sessions.get(source_id)  # SessionError for a session of another model
        except BaseException:
            self.sessions.release(session_id)
            raise
        seq.resume_seconds = time.monotonic() - started if saved is not None else None
        seq.session_id = session_id
        self._active_sessions[session_id] = seq.request_id
        if saved is None:
            return
        prompt, tokens = seq.prompt_ids, saved.tokens
        common = 0
        for a, b in zip(tokens, prompt):
            if a != b:
                break
            common += 1
        whole = saved.num_checkpoints == len(tokens) // self.model.config.segment_size
        exact = common == len(tokens) < len(prompt) and saved.slot is not None and whole
        if exact:
            blocks, start = saved.num_checkpoints, len(tokens)
        else:  # restart from the last checkpoint at or before the divergence (one token left to read)
            blocks = min(saved.num_checkpoints, min(common, len(prompt) - 1) // self.model.config.segment_size)
            start = blocks * self.model.config.segment_size
        seq.resume_blocks = blocks
        seq.num_computed_tokens = seq.num_reused_tokens = start
        self._resume[seq.request_id] = (saved, exact)

    def _save_session(self, seq: Sequence) -> Future | None:
        """Save what the sequence has read, before its slot and blocks are freed: its new
        blocks (those the store does not hold yet), its slot and its manifest. Returns the write."""
        store = self.sessions
        if seq.status == SequenceStatus.RUNNING and seq.slot is not None:
            tier = "device"
        elif seq.status == SequenceStatus.SWAPPED and seq.request_id in self._swapped_slots:
            tier = "host"
        else:  # never started, or reset for recompute: the saved session stays as it was
            store.release(seq.session_id)
            return None
        try:
            slot = self.runner.read_slot(seq.slot) if tier == "device" else self._swapped_slots[seq.request_id]
            keys = [store.block_key(h) for h in self.scheduler.block_hashes(seq, len(seq.block_table))]
            unknown = store.unknown_blocks(seq.session_id, keys)
            read = self.runner.read_blocks([seq.block_table[i] for i in unknown], tier) if unknown else {}
            new_blocks = {keys[i]: {name: t[:, j].clone() for name, t in read.items()} for j, i in enumerate(unknown)}
        except BaseException:
            store.release(seq.session_id)
            raise
        return store.put(seq.session_id, seq.all_ids[:seq.num_computed_tokens], keys, new_blocks, slot)

    @property
    def max_model_len(self) -> int:
        """Prompt + generated tokens of one request, at most (what the device pool can hold)."""
        return self.scheduler.max_model_len

    def delete_session(self, session_id: str) -> bool:
        """Delete a saved session; SessionError "busy" while a request uses it (here, or on
        another replica: the store's lease)."""
        if session_id in self._active_sessions:
            raise SessionError(f"session {session_id!r} is busy with a request", "busy")
        return self.sessions.delete(session_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # --- the loop --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self._num_steps += 1
        plan = self.scheduler.schedule()
        self._move_states(plan)
        samplers = sampling_sequences(plan)
        masks = self._start_grammar_masks(samplers)  # filled while the forward runs
        logits = self._execute(plan)
        self.scheduler.update_after_step(plan)
        banned = self._finish_grammar_masks(masks)
        return [self._emit(seq, row, banned.get(seq.request_id)) for seq, row in zip(samplers, logits)]

    def _start_grammar_masks(self, seqs: list[Sequence]) -> tuple[list[str], Future] | None:
        constrained = [s.request_id for s in seqs if s.request_id in self._matchers]
        if not constrained:
            return None
        return constrained, self._grammars.fill_masks([self._matchers[r] for r in constrained])

    def _finish_grammar_masks(self, masks: tuple[list[str], Future] | None) -> dict[str, torch.Tensor]:
        """The tokens each constrained sequence may not sample now."""
        if masks is None:
            return {}
        constrained, bitmask = masks
        banned = banned_tokens(bitmask.result(), self.model.config.vocab_size, self.runner.device)
        return dict(zip(constrained, banned))

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
        for seq, slot, blocks, first_missing in plan.restores:
            saved, exact = self._resume.pop(seq.request_id)
            if len(blocks) > first_missing:
                self.runner.write_blocks(blocks[first_missing:], stack_blocks(saved.blocks[first_missing:len(blocks)]))
            if exact:
                self.runner.write_slot(slot, saved.slot)
            else:
                self.runner.init_slot(slot, blocks[-1] if blocks else None)
        for slot, last_block in plan.slot_inits:
            self.runner.init_slot(slot, last_block)

    def _execute(self, plan: StepPlan) -> list[torch.Tensor]:
        """Run the plan's forwards; the logits of each sampling sequence (sampling_sequences' order)."""
        now = time.monotonic()
        prefill_logits: dict[int, torch.Tensor] = {}
        for pack in pack_by_length([len(w.tokens) for w in plan.prefills]):
            works = [plan.prefills[i] for i in pack]
            for work in works:
                work.seq.first_scheduled_time = work.seq.first_scheduled_time or now
            rows = self.runner.prefill([w.seq.slot for w in works], [w.seq.block_table for w in works],
                                       [w.start for w in works], [w.tokens for w in works],
                                       [w.new_blocks for w in works])
            prefill_logits.update(zip(pack, rows))
        logits = [prefill_logits[i] for i, w in enumerate(plan.prefills) if w.samples]
        if plan.decodes:
            for work in plan.decodes:
                work.seq.first_scheduled_time = work.seq.first_scheduled_time or now
            rows = self.runner.decode([d.seq.slot for d in plan.decodes],
                                      [d.seq.block_table for d in plan.decodes],
                                      [d.position for d in plan.decodes],
                                      [d.token for d in plan.decodes],
                                      [d.new_block for d in plan.decodes])
            logits += [row for d, row in zip(plan.decodes, rows) if d.samples]
        return logits

    def _emit(self, seq: Sequence, logits: torch.Tensor, banned: torch.Tensor | None = None) -> RequestOutput:
        params = seq.params
        choice = sample(logits, params, self._generators[seq.request_id], seq.prompt_ids, seq.output_ids, banned)
        matcher = self._matchers.get(seq.request_id)
        seq.first_token_time = seq.first_token_time or time.monotonic()
        reason = None
        new_ids, text = [choice.token], ""
        if choice.token in params.stop_token_ids and (not params.ignore_eos or matcher is not None):
            reason, new_ids = "stop", []
        else:
            seq.output_ids.append(choice.token)
            if matcher is not None and (not matcher.accept(choice.token) or matcher.done):
                reason = "stop"  # the grammar is complete (a refused token cannot be sampled)
            detok = self._detokenizers.get(seq.request_id)
            if detok is not None:
                text = detok.add(choice.token)
                if detok.stopped:
                    reason = "stop"
            if reason is None and len(seq.output_ids) >= params.max_tokens:
                reason = "length"
        persisted = None
        if reason is not None:
            detok = self._detokenizers.get(seq.request_id)
            if detok is not None and not detok.stopped:
                text += detok.finish()
            persisted = self._end(seq, reason)
        return RequestOutput(seq.request_id, seq.group_id, seq.index, new_ids, text, reason is not None, reason,
                             len(seq.prompt_ids), len(seq.output_ids), seq.num_reused_tokens,
                             [choice] if params.logprobs is not None else [], seq.arrival_time,
                             seq.first_scheduled_time, seq.first_token_time, seq.resume_seconds, persisted)

    def _end(self, seq: Sequence, reason: str) -> Future | None:
        """Finish `seq`; with a session, save it. Returns the save when the store is durable."""
        write = None
        try:
            if seq.session_id is not None:
                write = self._save_session(seq)
        finally:
            self.scheduler.finish(seq, reason)
            self._forget(seq)
        return write if self.sessions is not None and self.sessions.durability == "sync" else None

    def _forget(self, seq: Sequence) -> None:
        if seq.session_id is not None:
            self._active_sessions.pop(seq.session_id, None)
        self._resume.pop(seq.request_id, None)
        self._matchers.pop(seq.request_id, None)
        self.sequences.pop(seq.request_id, None)
        self._generators.pop(seq.request_id, None)
        self._detokenizers.pop(seq.request_id, None)
        self._swapped_slots.pop(seq.request_id, None)

    # --- introspection ---------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """A snapshot of the scheduler and the pools (call under the engine's lock)."""
        sched, pool, S = self.scheduler, self.scheduler.pool, self.model.config.segment_size
        blocks = {}
        for tier in TIERS:
            t = pool[tier]
            blocks[tier, "used"], blocks[tier, "cached"], blocks[tier, "free"] = \
                t.num_used, t.num_cached, len(t.free_ids)
        return EngineStats(
            num_running=len(sched.running), num_waiting=len(sched.waiting), num_swapped=len(sched.swapped),
            num_free_slots=len(sched.free_slots), blocks=blocks, block_nbytes=self.runner.block_nbytes,
            prefix_query_tokens=pool.prefix_queries * S, prefix_hit_tokens=pool.prefix_hits * S,
            block_evictions=pool.device.evictions, num_swapped_out=sched.num_swapped_out,
            num_swapped_in=sched.num_swapped_in, num_recomputed=sched.num_recomputed, num_steps=self._num_steps)


def sampling_sequences(plan: StepPlan) -> list[Sequence]:
    """The sequences that sample a token in this step, in the order _execute gives their logits."""
    return [w.seq for w in plan.prefills if w.samples] + [d.seq for d in plan.decodes if d.samples]


__all__ = ["LLMEngine", "RequestOutput", "EngineError", "QueueFull", "ContextTooLong", "SequenceStatus"]

