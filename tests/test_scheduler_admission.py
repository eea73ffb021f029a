"""The scheduler, torch-free: a request that fits `max_model_len` always finishes, alone on a
tiny pool or competing with others, through swap and recompute; no step can spin forever."""

import pytest

from engine.config import EngineConfig
from engine.params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence

S = 5  # segment size


def run_to_completion(scheduler: Scheduler, seqs: list[Sequence], max_steps: int = 2000) -> int:
    """Drive the scheduler as the engine does (every step that reaches a sequence's last token
    samples one more); returns the steps taken."""
    for seq in seqs:
        scheduler.add(seq)
    for step in range(1, max_steps + 1):
        plan = scheduler.schedule()
        sampled = [w.seq for w in plan.prefills if w.samples]
        sampled += [d.seq for d in plan.decodes if d.position == d.seq.num_tokens - 1]
        scheduler.update_after_step(plan)
        for seq in sampled:
            seq.output_ids.append(7)
            if len(seq.output_ids) >= seq.params.max_tokens:
                scheduler.finish(seq, "length")
        if not scheduler.has_work():
            return step
    raise AssertionError(f"no progress: {[(s.request_id, s.num_computed_tokens, s.status) for s in seqs]}")


def sequence(rid: str, prompt_len: int, max_tokens: int) -> Sequence:
    return Sequence(rid, [(3 * i) % 50 for i in range(prompt_len)], SamplingParams(max_tokens=max_tokens))


def test_max_model_len_is_what_the_device_pool_holds_for_one_sequence():
    scheduler = Scheduler(EngineConfig(num_device_blocks=4, num_host_blocks=2, max_num_seqs=2,
                                       max_num_batched_tokens=8), S)
    assert scheduler.max_model_len == 5 * S - 1  # 4 checkpoints; the 25th token would need a 5th
    assert scheduler.fits(sequence("a", 3, scheduler.max_model_len - 3))
    assert not scheduler.fits(sequence("b", 3, scheduler.max_model_len - 2))


@pytest.mark.parametrize("host_blocks", [0, 2, 8])  # recompute only, a little swap, swap for all
def test_requests_that_fit_always_finish_on_a_tiny_pool(host_blocks):
    config = EngineConfig(num_device_blocks=4, num_host_blocks=host_blocks, max_num_seqs=3,
                          max_num_batched_tokens=8, max_prefill_chunk=8)
    scheduler = Scheduler(config, S)
    alone = sequence("alone", 3, scheduler.max_model_len - 3)  # needs every block of the pool
    run_to_completion(scheduler, [alone])
    assert len(alone.output_ids) == alone.params.max_tokens
    # Three that each fit but not together: preemption (swap or recompute) must not livelock.
    crowd = [sequence(f"s{i}", 4 + i, scheduler.max_model_len - 4 - i) for i in range(3)]
    run_to_completion(scheduler, crowd)
    assert all(len(s.output_ids) == s.params.max_tokens for s in crowd)
    assert scheduler.pool.device.num_used == 0 and sorted(scheduler.free_slots) == [0, 1, 2]


def test_prefill_is_capped_while_streams_decode():
    from engine.config import EngineConfig
    from engine.params import SamplingParams
    from engine.scheduler import Scheduler
    from engine.sequence import Sequence

    def plan_with(cap):
        scheduler = Scheduler(EngineConfig(max_num_seqs=4, max_num_batched_tokens=512, num_device_blocks=64,
                                           num_host_blocks=0, max_prefill_while_decoding=cap), segment_size=8)
        streaming = Sequence("a", [1, 2, 3], SamplingParams())
        scheduler.add(streaming)
        scheduler.update_after_step(scheduler.schedule())  # its prompt read: from now on it decodes
        streaming.output_ids.append(7)
        scheduler.add(Sequence("b", list(range(300)), SamplingParams()))
        return scheduler.schedule()

    capped, free = plan_with(64), plan_with(0)
    assert len(capped.decodes) == len(free.decodes) == 1
    assert sum(len(p.tokens) for p in capped.prefills) == 64
    assert sum(len(p.tokens) for p in free.prefills) == 300


def test_prefill_budget_keeps_a_mixed_step_within_the_stretch():
    from engine.prefill_budget import PrefillBudget

    budget = PrefillBudget(stretch=3.0, floor=64)
    assert budget.tokens() is None  # nothing learned yet: no bound
    for _ in range(20):
        budget.observe(decoding=True, prefill_tokens=0, seconds=0.020)     # decode-only steps: 20 ms
        budget.observe(decoding=True, prefill_tokens=1000, seconds=0.120)  # prompts read at 10k tokens/s
    # a mixed step may take 3 decode steps: 40 ms of prompts beside the decode, 400 tokens
    assert abs(budget.tokens() - 400) <= 4
    for _ in range(40):  # very slow prompts: the floor holds
        budget.observe(decoding=False, prefill_tokens=50, seconds=1.0)
    assert budget.tokens() == 64
    assert PrefillBudget(stretch=0.0, floor=64).tokens() is None


def test_the_engine_learns_the_budget_and_the_scheduler_caps_by_it():
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.params import SamplingParams
    from tests.helpers import tiny_model

    engine = LLMEngine(tiny_model(), EngineConfig(max_num_seqs=4, max_num_batched_tokens=512, num_device_blocks=256,
                                                  num_host_blocks=0, decode_step_stretch=2.0))
    engine.add_request(list(range(1, 20)), SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(10):
        engine.step()  # decode-only steps after the first
    engine.add_request(list(range(1, 40)), SamplingParams(max_tokens=40, ignore_eos=True))
    engine.step()  # a mixed step
    assert engine.prefill_budget.decode_s is not None and engine.prefill_budget.tokens_per_s is not None
    engine.prefill_budget.tokens_per_s = 1.0  # pretend prompts are slow: one segment per step
    engine.add_request(list(range(1, 50)) * 4, SamplingParams(max_tokens=4, ignore_eos=True))
    engine.scheduler.prefill_cap = engine.prefill_budget.tokens()
    plan = engine.scheduler.schedule()
    assert plan.decodes and sum(len(w.tokens) for w in plan.prefills) <= 5  # the floor: one segment of 5
