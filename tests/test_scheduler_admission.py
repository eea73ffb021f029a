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

