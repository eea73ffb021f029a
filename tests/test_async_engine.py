"""AsyncEngine: concurrent streams, abort when the consumer goes away, clean shutdown."""

import asyncio

import pytest

from engine.async_engine import AsyncEngine, EngineStopped
from engine.llm_engine import EngineError, LLMEngine
from engine.params import SamplingParams
from engine.sessions import SessionStore
from tests.test_engine import assert_pools_empty, make_engine, prompts, reference_greedy, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(memory="gla", aggregation="grm")


async def collect(engine, prompt, params, **kw):
    out = {}
    async for item in engine.generate(prompt, params, **kw):
        out.setdefault(item.index, []).extend(item.new_token_ids)
    return out


def test_concurrent_streams_equal_reference(model):
    async def main():
        engine = AsyncEngine(make_engine(model))
        ps = prompts(5)
        params = SamplingParams(max_tokens=8, temperature=0.0)
        results = await asyncio.gather(*[collect(engine, p, params) for p in ps])
        await engine.shutdown()
        return engine, ps, results
    engine, ps, results = asyncio.run(main())
    for p, r in zip(ps, results):
        assert r[0] == reference_greedy(model, p, 8)
    assert_pools_empty(engine.engine)


def test_consumer_that_goes_away_aborts_its_request(model):
    async def main():
        engine = AsyncEngine(make_engine(model))
        stream = engine.generate(prompts(1)[0], SamplingParams(max_tokens=300, temperature=0.0))
        async for _ in stream:
            break
        await stream.aclose()
        stats = engine.stats  # published under the lock by the abort
        await engine.shutdown()
        return engine, stats
    engine, stats = asyncio.run(main())
    assert stats.num_running == 0 and stats.blocks["device", "used"] == 0
    assert_pools_empty(engine.engine)


def test_errors_surface_before_streaming_and_n_samples_stream(model):
    async def main():
        engine = AsyncEngine(make_engine(model))
        with pytest.raises(EngineError, match="empty"):
            await collect(engine, [], SamplingParams())
        many = await collect(engine, prompts(1)[0], SamplingParams(max_tokens=4, temperature=1.0, seed=1), n=3)
        await engine.shutdown()
        with pytest.raises(EngineStopped):
            await collect(engine, [1], SamplingParams())
        return many
    many = asyncio.run(main())
    assert sorted(many) == [0, 1, 2] and all(len(v) == 4 for v in many.values())


def test_shutdown_aborts_stragglers_and_saves_their_session(model, tmp_path):
    async def main():
        store = SessionStore(model.fingerprint, tmp_path)
        engine = AsyncEngine(LLMEngine(model, make_engine(model, num_device_blocks=2100).config, store))
        stream = engine.generate(prompts(1)[0], SamplingParams(max_tokens=10_000, temperature=0.0),
                                 session_id="long")
        first = await stream.__anext__()
        await engine.shutdown(grace_s=0.2)
        rest = [item async for item in stream]
        return store, first, rest
    store, first, rest = asyncio.run(main())
    assert rest and rest[-1].finish_reason == "abort"
    assert store.get("long") is not None and len(store.get("long").tokens) > len(prompts(1)[0])


def test_a_step_that_fails_after_finishing_a_request_still_fails_its_stream(model):
    async def main():
        engine = AsyncEngine(make_engine(model))
        real_step = engine.engine.step

        def step_then_fail():
            real_step()  # finishes (and forgets) the one-token request, then the step "fails"
            raise RuntimeError("boom")
        engine.engine.step = step_then_fail
        with pytest.raises(RuntimeError, match="boom"):
            await asyncio.wait_for(collect(engine, prompts(1)[0], SamplingParams(max_tokens=1)), 30)
        engine.engine.step = real_step
        await engine.shutdown()
    asyncio.run(main())
