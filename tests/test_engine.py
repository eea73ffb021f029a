"""LLMEngine: batched continuous decoding equals one-sequence-at-a-time decoding, and every
way a request can end leaves the pools exactly as free as before."""

import pytest
import torch

import models
from engine.config import EngineConfig
from engine.llm_engine import EngineError, LLMEngine
from engine.params import SamplingParams
from engine.sessions import SessionStore
from tests.helpers import tiny_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def reference_greedy(model, prompt, max_tokens):
    state = model.new_state(1)
    with torch.no_grad():
        logits = model.prefill(torch.tensor([prompt]), state)[0, -1]
        out = []
        for _ in range(max_tokens):
            out.append(int(logits.argmax()))
            logits = model.decode(torch.tensor([out[-1]]), state)[0]
    return out


def make_engine(model, **overrides):
    options = dict(max_num_seqs=4, max_num_batched_tokens=16, num_device_blocks=64, num_host_blocks=64,
                   max_prefill_chunk=8)
    return LLMEngine(model, EngineConfig(**{**options, **overrides}))


def prompts(n, seed=0, lengths=(3, 17, 9, 1, 12, 6)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 61, (lengths[i % len(lengths)],), generator=gen).tolist() for i in range(n)]


def assert_pools_empty(engine):
    stats = engine.stats()
    assert stats.blocks["device", "used"] == 0 and stats.blocks["host", "used"] == 0
    assert stats.num_free_slots == engine.config.max_num_seqs
    assert stats.num_running == stats.num_waiting == stats.num_swapped == 0


@pytest.mark.parametrize("arch,memory,aggregation", [
    ("mcserve", "gla", "grm"), ("mcserve", "delta", "ssc"), ("mcserve", "linear", "residual"),
    ("mcserve", "gla", "none"), ("mamba2", "gla", "none"), ("mamba2", "gla", "grm"),
    ("gated_deltanet", "delta", "ssc")])
def test_batched_greedy_equals_one_at_a_time(arch, memory, aggregation):
    model = tiny_model(arch=arch, memory=memory, aggregation=aggregation)
    engine = make_engine(model)
    ps = prompts(6)
    seqs, step = [], 0
    while len(seqs) < len(ps) or engine.has_unfinished():
        if step % 2 == 0 and len(seqs) < len(ps):  # requests arrive while others run
            seqs.append(engine.add_request(ps[len(seqs)], GREEDY))
        engine.step()
        step += 1
    for prompt, seq in zip(ps, seqs):
        assert seq.output_ids == reference_greedy(model, prompt, 12), prompt
        assert seq.finish_reason == "length"
    assert_pools_empty(engine)


@pytest.mark.parametrize("arch,memory,aggregation", [("mcserve", "gla", "grm"), ("mcserve", "delta", "residual"),
                                                     ("mamba2", "gla", "ssc")])
def test_packed_prefill_at_odd_positions_equals_one_at_a_time(arch, memory, aggregation):
    """Prompts arrive while others decode, and a small odd prefill cap cuts them mid-segment, so
    steps pack chunks of different lengths, starts and checkpoint counts into one forward."""
    model = tiny_model(arch=arch, memory=memory, aggregation=aggregation)
    engine = make_engine(model, max_num_batched_tokens=32, max_prefill_chunk=32, max_prefill_while_decoding=7)
    ps = prompts(8, seed=3, lengths=(23, 4, 17, 11, 2, 29, 8, 13))
    seqs, step = [], 0
    while len(seqs) < len(ps) or engine.has_unfinished():
        if step % 3 == 0 and len(seqs) < len(ps):
            seqs += [engine.add_request(ps[len(seqs)], GREEDY), engine.add_request(ps[len(seqs) + 1], GREEDY)]
        engine.step()
        step += 1
    for prompt, seq in zip(ps, seqs):
        assert seq.output_ids == reference_greedy(model, prompt, 12), prompt
    assert_pools_empty(engine)


@pytest.mark.parametrize("arch,memory,aggregation", [("mcserve", "gla", "grm"), ("mamba2", "gla", "ssc"),
                                                     ("gated_deltanet", "delta", "soup")])
def test_bf16_weights_engine_equals_the_bf16_model(arch, memory, aggregation):
    """Weights in bf16 (the server's --dtype bf16) with fp32 checkpoints: the engine's greedy
    outputs are the bf16 model's own."""
    model = tiny_model(arch=arch, memory=memory, aggregation=aggregation).to(torch.bfloat16)
    engine = make_engine(model, ckpt_dtype="fp32")
    ps = prompts(5, seed=7)
    for prompt, out in zip(ps, engine.generate(ps, GREEDY)):
        assert out == reference_greedy(model, prompt, 12), prompt
    assert_pools_empty(engine)


def test_checkpoints_are_stored_as_the_weights_by_default():
    """ckpt_dtype "auto": bf16 weights store bf16 checkpoints (what the decode step reads most),
    fp32 weights fp32 ones; a dtype given is kept."""
    model = tiny_model()
    assert make_engine(model).runner.blocks["ckpt"].dtype == torch.float32
    bf16_model = tiny_model().to(torch.bfloat16)
    store = SessionStore(bf16_model.fingerprint)
    bf16 = LLMEngine(bf16_model, EngineConfig(max_num_seqs=2, num_device_blocks=8, num_host_blocks=0), store)
    assert bf16.config.ckpt_dtype == "bf16" and bf16.runner.blocks["ckpt"].dtype == torch.bfloat16
    assert store.block_key("h").split("-")[1] == "bf16"  # the saved blocks say what they hold
    assert make_engine(model, ckpt_dtype="bf16").runner.blocks["ckpt"].dtype == torch.bfloat16


def test_pool_pressure_swaps_and_recomputes_without_changing_outputs():
    model = tiny_model(memory="gla", aggregation="grm")
    ps = prompts(4, seed=3, lengths=(14, 11, 16, 9))
    params = SamplingParams(max_tokens=20, temperature=0.0)
    expected = [reference_greedy(model, p, 20) for p in ps]
    # 14 device blocks cannot hold 4 sequences of ~35 tokens (7 blocks each): preemption happens.
    for host_blocks in (64, 0):  # swap to host, or (no host room) recompute
        engine = make_engine(model, num_device_blocks=14, num_host_blocks=host_blocks)
        assert engine.generate(ps, params) == expected
        assert engine.scheduler.num_preemptions > 0
        assert_pools_empty(engine)


@pytest.mark.parametrize("arch,memory,aggregation", [
    ("mcserve", "gla", "grm"), ("mamba2", "gla", "grm"), ("gated_deltanet", "delta", "grm"),
    ("mamba2", "gla", "none")])  # `none`, as an imported checkpoint is served: its blocks are restart points
def test_prefix_reuse_shares_exactly_the_common_segments(arch, memory, aggregation):
    model = tiny_model(arch=arch, memory=memory, aggregation=aggregation)
    engine = make_engine(model)
    shared = prompts(1, seed=5, lengths=(17,))[0]      # 3 whole segments of 5, then 2 tokens
    first = engine.add_request(shared + [1, 2, 3], GREEDY)
    while engine.has_unfinished():
        engine.step()
    second = engine.add_request(shared + [4, 5], GREEDY)
    while engine.has_unfinished():
        engine.step()
    assert first.num_reused_tokens == 0
    assert second.num_reused_tokens == 15  # exactly the 3 common whole segments
    assert engine.scheduler.pool.prefix_hits == 3
    assert second.output_ids == reference_greedy(model, shared + [4, 5], 12)
    assert_pools_empty(engine)


def test_abort_stop_and_max_tokens_free_everything():
    model = tiny_model(memory="delta", aggregation="grm", vocab_size=260)
    model.tokenizer = models.byte_tokenizer()
    engine = make_engine(model)
    ps = prompts(4, seed=7)
    a = engine.add_request(ps[0], SamplingParams(max_tokens=50, temperature=0.0))
    b = engine.add_request(ps[1], SamplingParams(max_tokens=3, temperature=0.0))
    # A stop token id that greedy decoding hits at once: the first greedy token.
    first = reference_greedy(model, ps[2], 1)[0]
    c = engine.add_request(ps[2], SamplingParams(max_tokens=50, temperature=0.0, stop_token_ids=(first,)))
    for _ in range(4):
        engine.step()
    engine.abort(a.request_id)
    while engine.has_unfinished():
        engine.step()
    assert (a.finish_reason, b.finish_reason, c.finish_reason) == ("abort", "length", "stop")
    assert len(b.output_ids) == 3 and c.output_ids == []
    assert_pools_empty(engine)


def test_stop_strings_cut_the_text():
    model = tiny_model(memory="gla", aggregation="grm", vocab_size=260)
    model.tokenizer = tok = models.byte_tokenizer()
    engine = make_engine(model)
    prompt = tok.encode("hello")
    free = engine.add_request(prompt, SamplingParams(max_tokens=30, temperature=0.0))
    while engine.has_unfinished():
        engine.step()
    text = tok.decode(free.output_ids)
    stop = text[5:7]
    assert len(stop) == 2 and text.find(stop) == 5
    engine2 = make_engine(model)
    seq = engine2.add_request(prompt, SamplingParams(max_tokens=30, temperature=0.0, stop=(stop,)))
    pieces = []
    while engine2.has_unfinished():
        pieces += [o.new_text for o in engine2.step()]
    assert "".join(pieces) == text[:5] and seq.finish_reason == "stop"
    assert_pools_empty(engine2)


def test_seeded_sampling_is_reproducible_in_a_batch():
    model = tiny_model(memory="gla", aggregation="ssc")
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    alone = make_engine(model).generate([prompts(1)[0]], params)[0]
    batched = make_engine(model).generate(prompts(3), params)[0]
    assert alone == batched


def test_bad_requests_are_refused():
    engine = make_engine(tiny_model())
    with pytest.raises(EngineError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(EngineError, match="token ids must be in"):
        engine.add_request([1, 999], GREEDY)
    engine.add_request([1], GREEDY, request_id="x")
    with pytest.raises(EngineError, match="already in use"):
        engine.add_request([1], GREEDY, request_id="x")


def test_n_samples_share_the_prompt_checkpoints():
    model = tiny_model(memory="gla", aggregation="grm")
    engine = make_engine(model)
    prompt = prompts(1, seed=9, lengths=(17,))[0]  # 3 whole segments
    seqs = engine.add_group(prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=5), n=3)
    while engine.has_unfinished():
        engine.step()
    assert [s.num_reused_tokens for s in seqs] == [0, 15, 15]
    assert engine.scheduler.pool.prefix_hits == 6
    # Sample i used seed 5 + i: each equals a lone request with that seed.
    for i, seq in enumerate(seqs):
        alone = make_engine(model).generate([prompt], SamplingParams(max_tokens=6, temperature=1.0, seed=5 + i))[0]
        assert seq.output_ids == alone
    assert len({tuple(s.output_ids) for s in seqs}) > 1
    assert_pools_empty(engine)


@pytest.mark.parametrize("arch,memory,aggregation,boundary", [
    ("mcserve", "gla", "grm", "carry"), ("mcserve", "delta", "ssc", "carry"), ("mcserve", "linear", "residual", "carry"),
    ("mcserve", "gla", "soup", "carry"), ("mcserve", "delta", "none", "carry"), ("mcserve", "gla", "ssc", "reset"),
    ("mcserve", "delta", "grm", "reset"), ("mamba2", "gla", "none", "carry"), ("mamba2", "gla", "ssc", "carry"),
    ("gated_deltanet", "delta", "grm", "carry")])
def test_engine_on_triton_kernels_equals_torch_path(arch, memory, aggregation, boundary):
    """End to end: the kernels (decode step, cached read-out, segment end, chunk prefill;
    Triton interpreter on the CPU, real on CUDA) give the same greedy outputs as the torch path."""
    model = tiny_model(arch=arch, memory=memory, aggregation=aggregation, boundary=boundary)
    ps = prompts(3, seed=2, lengths=(12, 3, 7))
    params = SamplingParams(max_tokens=9, temperature=0.0)
    torch_out = make_engine(model, kernels="torch").generate(ps, params)
    engine = make_engine(model, kernels="triton")
    assert engine.runner.use_triton and engine.runner.scan is not None
    assert engine.generate(ps, params) == torch_out
    assert_pools_empty(engine)
