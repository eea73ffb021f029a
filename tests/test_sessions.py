"""Persistent sessions: resume equals uninterrupted generation, from memory and from disk, after
a divergence, a crash; bad files fail alone; the index evicts by its limits."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.params import SamplingParams
from engine.session_index import SessionError, SessionLimits
from engine.sessions import SessionStore
from tests.helpers import tiny_model

GREEDY = SamplingParams(max_tokens=7, temperature=0.0)
CONFIG = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, num_device_blocks=64, num_host_blocks=16,
                      max_prefill_chunk=16)


@pytest.fixture(scope="module")
def model():
    return tiny_model(memory="gla", aggregation="grm")


def engine_for(model, directory=None, limits=None):
    return LLMEngine(model, CONFIG, SessionStore(model.fingerprint, directory, limits))


def run(engine, prompt, session_id=None, params=GREEDY):
    seq = engine.add_request(prompt, params, session_id=session_id)
    while engine.has_unfinished():
        engine.step()
    return seq


def fresh_output(model, prompt, params=GREEDY):
    return run(LLMEngine(model, CONFIG), prompt, params=params).output_ids


P1 = [(7 * i) % 61 for i in range(13)]
USER2 = [3, 1, 4, 1, 5, 9, 2, 6]


def test_resume_from_memory_and_from_disk_equals_uninterrupted(model, tmp_path):
    engine = engine_for(model, tmp_path)
    turn1 = run(engine, P1, "chat")
    p2 = P1 + turn1.output_ids + USER2
    turn2 = run(engine, p2, "chat")
    assert turn2.num_reused_tokens == len(P1) + len(turn1.output_ids) - 1  # all but the last sampled
    assert turn2.output_ids == fresh_output(model, p2)
    # Tear the engine down; a new one finds the session on disk.
    p3 = p2 + turn2.output_ids + USER2
    engine.sessions.flush()  # as shutdown does
    engine = engine_for(model, tmp_path)
    assert [e.session_id for e in engine.sessions.list()] == ["chat"]
    turn3 = run(engine, p3, "chat")
    assert turn3.num_reused_tokens == len(p2) + len(turn2.output_ids) - 1
    assert turn3.output_ids == fresh_output(model, p3)
    assert engine.pool_usage()["device_used"] == 0


def test_divergent_prompt_restarts_from_the_checkpoint_before_it(model, tmp_path):
    engine = engine_for(model, tmp_path)
    run(engine, P1 + [1, 2, 3, 4, 5, 6, 7], "s")   # 20 tokens read: 3 whole segments saved
    diverged = P1[:13] + [60, 59, 58]               # differs at token 13 (inside segment 2)
    seq = run(engine, diverged, "s")
    assert seq.num_reused_tokens == 10              # checkpoints 0 and 1 end at or before 13
    assert seq.output_ids == fresh_output(model, diverged)
    shorter = P1[:10]                                # a prefix of what was saved: keep a token to read
    seq = run(engine, shorter, "s")
    assert seq.num_reused_tokens == 5 and seq.output_ids == fresh_output(model, shorter)


def test_one_request_at_a_time_per_session(model):
    engine = engine_for(model)
    engine.add_request(P1, GREEDY, session_id="busy")
    with pytest.raises(SessionError, match="busy") as err:
        engine.add_request(P1, GREEDY, session_id="busy")
    assert err.value.code == "busy"
    while engine.has_unfinished():
        engine.step()
    run(engine, P1, "busy")  # free again once the first is done


def test_abort_saves_what_was_read(model):
    engine = engine_for(model)
    seq = engine.add_request(P1, SamplingParams(max_tokens=50, temperature=0.0), session_id="a")
    for _ in range(4):
        engine.step()
    engine.abort(seq.request_id)
    saved = engine.sessions.get("a")
    assert saved.tokens == seq.all_ids[:seq.num_computed_tokens] and len(saved.tokens) > len(P1)
    assert engine.pool_usage()["device_used"] == 0


@pytest.mark.parametrize("damage", ["truncate", "flip", "wrong_model"])
def test_a_bad_session_file_fails_alone(model, tmp_path, damage):
    engine = engine_for(model, tmp_path)
    run(engine, P1, "good")
    run(engine, P1, "bad")
    engine.sessions.flush()
    path = tmp_path / "bad.session.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    fingerprint = "someone-else" if damage == "wrong_model" else model.fingerprint
    engine = LLMEngine(model, CONFIG, SessionStore(fingerprint, tmp_path))
    with pytest.raises(SessionError) as err:
        engine.add_request(P1 + USER2, GREEDY, session_id="bad")
    assert err.value.code == ("wrong_model" if damage == "wrong_model" else "corrupt")
    if damage != "wrong_model":
        seq = run(engine, P1 + USER2, "good")  # the others keep working
        assert seq.num_reused_tokens > 0 and seq.output_ids == fresh_output(model, P1 + USER2)


def test_saved_session_survives_kill_9(model, tmp_path):
    # A separate process builds the same tiny model (same seed, same fingerprint), saves a
    # session, and is killed with SIGKILL while idle.
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {os.getcwd()!r})
        from tests.test_sessions import CONFIG, GREEDY, P1, run
        from tests.helpers import tiny_model
        from engine.llm_engine import LLMEngine
        from engine.sessions import SessionStore
        model = tiny_model(memory="gla", aggregation="grm")
        engine = LLMEngine(model, CONFIG, SessionStore(model.fingerprint, {str(tmp_path / 'sessions')!r}))
        seq = run(engine, P1, "crash")
        engine.sessions.flush()  # the write has landed: from here on it must survive anything
        print("saved", *seq.output_ids, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert line[0] == "saved"
    output1 = [int(t) for t in line[1:]]
    engine = engine_for(model, tmp_path / "sessions")
    p2 = P1 + output1 + USER2
    seq = run(engine, p2, "crash")
    assert seq.num_reused_tokens == len(P1) + len(output1) - 1
    assert seq.output_ids == fresh_output(model, p2)


def test_memory_tier_evicts_to_disk_and_disk_tier_evicts_lru(model, tmp_path):
    limits = SessionLimits(max_memory_sessions=2, max_disk_sessions=3)
    engine = engine_for(model, tmp_path, limits)
    for name in ["s1", "s2", "s3", "s4"]:
        run(engine, P1, name)
    store = engine.sessions
    assert sorted(store.memory) == ["s3", "s4"]
    assert sorted(e.session_id for e in store.list()) == ["s2", "s3", "s4"]  # s1: LRU, dropped
    assert store.index.evictions["disk"] == 1 and store.index.evictions["memory"] >= 2
    assert {e.session_id: e.tier for e in store.list()} == {"s2": "disk", "s3": "memory", "s4": "memory"}
    assert store.get("s2") is not None and store.delete("s2") and store.get("s2") is None
    with pytest.raises(SessionError, match="session id must be"):
        store.get("../etc/passwd")


def test_a_failed_session_write_is_reported_not_fatal(model, tmp_path):
    engine = engine_for(model, tmp_path)
    (tmp_path / "blocked.session.safetensors").mkdir()  # the rename onto it must fail
    run(engine, P1, "blocked")
    engine.sessions.flush()
    assert engine.sessions.writer.errors and "blocked" in engine.sessions.writer.errors[-1]
    assert not list(tmp_path.glob("*.tmp"))  # no half-written file left behind
    assert engine.sessions.get("blocked") is not None  # still served from memory
    run(engine, P1, "fine")  # and the engine goes on
    engine.sessions.flush()
    assert (tmp_path / "fine.session.safetensors").is_file()
