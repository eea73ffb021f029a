"""Scheduler: continuous batching under a token budget, chunked prefill, preemption. No torch.

Each `schedule()` plans one engine step:
1. every running sequence with one token left to read decodes it (oldest first); a token that ends a
   segment needs a fresh checkpoint block, and if none is left the youngest running sequence
   is preempted: swapped to host memory when there is room there, else reset for recompute
   (its tokens are kept, so nothing is lost, only recomputed);
2. running sequences with more to read (a prompt, or tokens to recompute) get a prefill chunk;
   while any sequence decodes, the prefill tokens of a step are capped (max_prefill_while_decoding);
3. swapped sequences come back, then waiting ones are admitted (installing a resumed session's
   checkpoints, or sharing a cached prefix), while slots, blocks and the token budget last.

Prefill chunks end on segment boundaries where possible, so checkpoints fall out of the chunked
path at chunk ends. A sequence computes `all_ids[num_computed:]`; the step that reaches its last
token samples the next one. The engine runs the plan, then calls `update_after_step`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .config import EngineConfig
from .sequence import Sequence, SequenceStatus
from .state_pool import PoolExhausted, StatePool, segment_hashes


@dataclass
class PrefillWork:
    seq: Sequence
    start: int
    tokens: list[int]
    new_blocks: list[int]
    samples: bool              # reaches the last token: sample from its logits


@dataclass
class DecodeWork:
    seq: Sequence
    token: int
    position: int
    new_block: int | None

    @property
    def samples(self) -> bool:
        """Samples unless still reading the prompt (a one-token remainder runs as a decode)."""
        return self.position == self.seq.num_tokens - 1


@dataclass
class StepPlan:
    # (sequence, the slot to save before reuse, (device, host) block pairs to copy)
    swap_out: list[tuple[Sequence, int, list[tuple[int, int]]]] = field(default_factory=list)
    swap_in: list[tuple[Sequence, list[tuple[int, int]]]] = field(default_factory=list)
    slot_inits: list[tuple[int, int | None]] = field(default_factory=list)  # (slot, last reused block)
    # Sessions resumed: (sequence, its slot, its block table, index of the first block to fill
    # from the saved state; those before it were still cached on the device)
    restores: list[tuple[Sequence, int, list[int], int]] = field(default_factory=list)
    prefills: list[PrefillWork] = field(default_factory=list)
    decodes: list[DecodeWork] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: EngineConfig, segment_size: int):
        self.config = config
        self.segment_size = segment_size
        self.pool = StatePool(config.num_device_blocks, config.num_host_blocks)
        self.free_slots: list[int] = list(range(config.max_num_seqs - 1, -1, -1))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.num_swapped_out = self.num_swapped_in = self.num_recomputed = 0

    # --- queue -----------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        """The longest sequence (prompt + generated tokens) that can run: a running sequence
        holds one device block per finished segment, so a longer one could never be scheduled
        whole, only preempted again and again."""
        return (self.config.num_device_blocks + 1) * self.segment_size - 1

    def fits(self, seq: Sequence) -> bool:
        return len(seq.prompt_ids) + seq.params.max_tokens <= self.max_model_len

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out wherever it is and give back everything it holds."""
        if seq.is_finished:
            return
        for queue in (self.waiting, self.swapped):
            if seq in queue:
                queue.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        tier = "host" if seq.status == SequenceStatus.SWAPPED else "device"
        self.pool.release_all(seq.block_table, tier)
        seq.block_table = []
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            seq.slot = None
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    # --- planning --------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        for seq in list(self.running):
            if seq not in self.running or self._remaining(seq) != 1 or budget < 1:
                continue
            work = self._plan_decode(seq, plan)
            if work is not None:
                plan.decodes.append(work)
                budget -= 1
        if plan.decodes and self.config.max_prefill_while_decoding:
            # Running streams first: a burst of new prompts is read a bounded chunk per step, so that
            # it stretches their inter-token latency by that much and no more.
            budget = min(budget, self.config.max_prefill_while_decoding)
        for seq in list(self.running):
            if seq in self.running and self._remaining(seq) > 1 and budget > 0:
                work = self._plan_prefill(seq, budget, plan)
                if work is not None:
                    plan.prefills.append(work)
                    budget -= len(work.tokens)
        self._swap_in(plan)
        self._admit(plan, budget)
        return plan

    def _remaining(self, seq: Sequence) -> int:
        return seq.num_tokens - seq.num_computed_tokens

    def _ends_in(self, start: int, n: int) -> int:
        """Segments that end inside positions [start, start + n)."""
        S = self.segment_size
        return (start + n) // S - start // S

    def _plan_decode(self, seq: Sequence, plan: StepPlan) -> DecodeWork | None:
        position = seq.num_computed_tokens
        block = None
        if self._ends_in(position, 1):
            block = self._allocate_or_preempt(seq, plan)
            if block is None:
                return None  # seq itself was preempted
        return DecodeWork(seq, seq.all_ids[position], position, block)

    def _plan_prefill(self, seq: Sequence, budget: int, plan: StepPlan | None) -> PrefillWork | None:
        """The next chunk of `seq`; with `plan`, may preempt others for a block, else waits."""
        start, S = seq.num_computed_tokens, self.segment_size
        n = min(self._remaining(seq), budget, self.config.max_prefill_chunk)
        if start + n < seq.num_tokens and (start + n) // S * S > start:
            n = (start + n) // S * S - start  # end on a segment boundary
        n = min(n, self._longest_chunk_with(start, self.pool.device.num_free))
        if n > 0:
            blocks = [self.pool.device.allocate() for _ in range(self._ends_in(start, n))]
        else:  # the very next token ends a segment and no block is free
            block = self._allocate_or_preempt(seq, plan) if plan is not None else None
            if block is None:
                return None
            n, blocks = 1, [block]
        return PrefillWork(seq, start, seq.next_tokens(n), blocks, samples=start + n == seq.num_tokens)

    def _longest_chunk_with(self, start: int, free_blocks: int) -> int:
        """The longest chunk from `start` whose segment ends fit in `free_blocks`."""
        S = self.segment_size
        return (start // S + free_blocks + 1) * S - 1 - start

    def _allocate_or_preempt(self, seq: Sequence, plan: StepPlan) -> int | None:
        """A device block for `seq`, preempting the youngest running sequences if needed;
        None if `seq` itself had to be preempted."""
        while True:
            try:
                return self.pool.device.allocate()
            except PoolExhausted:
                victim = self.running[-1]
                self._preempt(victim, plan)
                if victim is seq:
                    return None

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self.num_preemptions += 1
        # Work already planned for it this step is dropped, with its fresh blocks.
        for work in [p for p in plan.prefills if p.seq is seq]:
            self.pool.release_all(work.new_blocks)
        for work in [d for d in plan.decodes if d.seq is seq and d.new_block is not None]:
            self.pool.release_all([work.new_block])
        plan.prefills = [p for p in plan.prefills if p.seq is not seq]
        plan.decodes = [d for d in plan.decodes if d.seq is not seq]
        if self.pool["host"].can_allocate(len(seq.block_table)):
            pairs = self.pool.move(seq.block_table, "device", "host")
            seq.block_table = [dst for _, dst in pairs]
            plan.swap_out.append((seq, seq.slot, pairs))  # the slot is freed once saved
            self.num_swapped_out += 1
            seq.slot, seq.status = None, SequenceStatus.SWAPPED
            self.swapped.appendleft(seq)
        else:  # no room on the host either: recompute later, keeping every token
            self.num_recomputed += 1
            self.pool.release_all(seq.block_table)
            seq.block_table, seq.num_computed_tokens, seq.resume_blocks = [], 0, None
            self.free_slots.append(seq.slot)
            seq.slot, seq.status = None, SequenceStatus.WAITING
            self.waiting.appendleft(seq)

    def _swap_in(self, plan: StepPlan) -> None:
        while self.swapped and self.free_slots:
            seq = self.swapped[0]
            if any(s is seq for s, _, _ in plan.swap_out):
                break  # swapped out this very step
            needed = len(seq.block_table) + 1  # and room for the checkpoint its next token may end
            if not self.pool.device.can_allocate(needed):
                break
            self.swapped.popleft()
            pairs = self.pool.move(seq.block_table, "host", "device")
            seq.block_table = [dst for _, dst in pairs]
            seq.slot = self.free_slots.pop()
            seq.status = SequenceStatus.RUNNING
            plan.swap_in.append((seq, pairs))
            self.num_swapped_in += 1
            self.running.append(seq)

    def _admit(self, plan: StepPlan, budget: int) -> None:
        while self.free_slots and budget > 0:
            seq = next((s for s in self.waiting if self._ready(s)), None)
            if seq is None or not self._take_state(seq, plan):
                break
            work = self._plan_first_chunk(seq, budget)
            if work is None:  # not even one segment's block is free: undo and wait
                self._give_back_state(seq, plan)
                break
            self.waiting.remove(seq)
            seq.status, seq.resume_blocks = SequenceStatus.RUNNING, None
            self.running.append(seq)
            if isinstance(work, DecodeWork):
                plan.decodes.append(work)
            else:
                plan.prefills.append(work)
            budget -= plan_tokens(work)

    @staticmethod
    def _ready(seq: Sequence) -> bool:
        """Samples 2..n of a request wait until the first has read the prompt, then share its
        prompt checkpoints through prefix reuse."""
        first = seq.wait_for
        return first is None or first.is_finished or first.num_computed_tokens >= len(first.prompt_ids)

    def _take_state(self, seq: Sequence, plan: StepPlan) -> bool:
        """A slot, and the blocks of a resumed session or a reused prefix."""
        if seq.resume_blocks is not None:
            # Blocks of the session still cached on the device (same tokens, same checkpoints)
            # are shared; only the missing ones are installed from the saved state.
            hashes = self.block_hashes(seq, seq.resume_blocks)
            shared = self.pool.device.lookup(hashes) if self.config.enable_prefix_reuse else []
            if not self.pool.device.can_allocate(seq.resume_blocks - len(shared) + 1):
                self.pool.release_all(shared)
                return False
            fresh = [self.pool.device.allocate() for _ in range(seq.resume_blocks - len(shared))]
            seq.block_table = shared + fresh
            self._publish(seq, len(shared))
            seq.slot = self.free_slots.pop()
            plan.restores.append((seq, seq.slot, list(seq.block_table), len(shared)))
            return True
        reused = self._reuse_prefix(seq)
        seq.slot = self.free_slots.pop()
        plan.slot_inits.append((seq.slot, reused[-1] if reused else None))
        return True

    def _give_back_state(self, seq: Sequence, plan: StepPlan) -> None:
        self.free_slots.append(seq.slot)
        seq.slot = None
        self.pool.release_all(seq.block_table)
        seq.block_table = []
        if seq.resume_blocks is not None:
            plan.restores.pop()
        else:
            plan.slot_inits.pop()
            seq.num_computed_tokens = seq.num_reused_tokens = 0

    def _plan_first_chunk(self, seq: Sequence, budget: int):
        if self._remaining(seq) == 1:
            position = seq.num_computed_tokens
            block = None
            if self._ends_in(position, 1):
                if not self.pool.device.can_allocate(1):
                    return None
                block = self.pool.device.allocate()
            return DecodeWork(seq, seq.all_ids[position], position, block)
        return self._plan_prefill(seq, budget, plan=None)

    def _reuse_prefix(self, seq: Sequence) -> list[int]:
        """Share the cached blocks of the longest matching prefix of whole segments."""
        if not self.config.enable_prefix_reuse or seq.num_computed_tokens:
            return []
        hashes = self.block_hashes(seq, seq.num_tokens // self.segment_size)
        # Keep at least one token to compute: its logits give the first sample.
        while hashes and len(hashes) * self.segment_size >= seq.num_tokens:
            hashes.pop()
        blocks = self.pool.lookup_prefix(hashes)
        seq.block_table = blocks
        seq.num_computed_tokens = seq.num_reused_tokens = len(blocks) * self.segment_size
        return blocks

    # --- after the step --------------------------------------------------------------------
    def update_after_step(self, plan: StepPlan) -> None:
        """Record progress, publish finished segments for prefix reuse, free saved slots."""
        self.free_slots += [slot for _, slot, _ in plan.swap_out]
        for work in plan.prefills:
            self._advance(work.seq, len(work.tokens), work.new_blocks)
        for work in plan.decodes:
            self._advance(work.seq, 1, [work.new_block] if work.new_block is not None else [])

    def _advance(self, seq: Sequence, n: int, new_blocks: list[int]) -> None:
        if seq.is_finished:
            return
        first_new = len(seq.block_table)
        seq.block_table += new_blocks
        seq.num_computed_tokens += n
        self._publish(seq, first_new)

    def _publish(self, seq: Sequence, first: int) -> None:
        """Make blocks `first...` of `seq` findable by later requests with the same prefix."""
        if self.config.enable_prefix_reuse and len(seq.block_table) > first:
            hashes = self.block_hashes(seq, len(seq.block_table))
            for i in range(first, len(seq.block_table)):
                self.pool.device.publish(seq.block_table[i], hashes[i])


    def block_hashes(self, seq: Sequence, n: int) -> list[str]:
        """The chain hashes of the first `n` segments of `seq` (cached on it: its tokens only grow)."""
        if len(seq.block_hashes) < n:
            seq.block_hashes = segment_hashes(seq.all_ids[:n * self.segment_size], self.segment_size,
                                              seq.block_hashes, seq.cache_salt)
        return seq.block_hashes[:n]


def plan_tokens(work: PrefillWork | DecodeWork) -> int:
    return len(work.tokens) if isinstance(work, PrefillWork) else 1
