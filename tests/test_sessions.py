"""Persistent sessions on the paged store: resume equals uninterrupted generation, from memory
and from the store, after a divergence, a crash; blocks are shared between sessions and only
new ones are written; damage resumes from the longest good prefix; v1 files convert; the store
evicts whole sessions by its limits."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.params import SamplingParams
from engine.session_index import SessionError, SessionLimits
from engine.sessions import SessionStore
from tests.helpers import tiny_model
from tests.legacy_v1_writer import write_v1

GREEDY = SamplingParams(max_tokens=7, temperature=0.0)
CONFIG = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, num_device_blocks=64, num_host_blocks=16,
                      max_prefill_chunk=16)


@pytest.fixture(scope="module", params=[("mcserve", "gla"), ("mamba2", "gla"), ("gated_deltanet", "delta")],
                ids=lambda p: p[0])
def model(request):
    arch, memory = request.param
    return tiny_model(arch=arch, memory=memory, aggregation="grm")


def engine_for(model, directory=None, limits=None, **options):
    return LLMEngine(model, CONFIG, SessionStore(model.fingerprint, directory, limits, **options))


def run(engine, prompt, session_id=None, params=GREEDY):
    seq = engine.add_request(prompt, params, session_id=session_id)
    while engine.has_unfinished():
        engine.step()
    return seq


def fresh_output(model, prompt, params=GREEDY):
    return run(LLMEngine(model, CONFIG), prompt, params=params).output_ids


def files(directory, kind):
    return sorted(p for p in (directory / kind).rglob("*") if p.is_file())


P1 = [(7 * i) % 61 for i in range(13)]
USER2 = [3, 1, 4, 1, 5, 9, 2, 6]


def test_resume_from_memory_and_from_the_store_equals_uninterrupted(model, tmp_path):
    engine = engine_for(model, tmp_path)
    turn1 = run(engine, P1, "chat")
    p2 = P1 + turn1.output_ids + USER2
    turn2 = run(engine, p2, "chat")
    assert turn2.num_reused_tokens == len(P1) + len(turn1.output_ids) - 1  # all but the last sampled
    assert turn2.output_ids == fresh_output(model, p2)
    # Tear the engine down; a new one finds the session in the directory.
    p3 = p2 + turn2.output_ids + USER2
    engine.sessions.flush()
    engine = engine_for(model, tmp_path)
    assert [e.session_id for e in engine.sessions.list()] == ["chat"]
    turn3 = run(engine, p3, "chat")
    assert turn3.num_reused_tokens == len(p2) + len(turn2.output_ids) - 1
    assert turn3.output_ids == fresh_output(model, p3)
    assert engine.stats().blocks["device", "used"] == 0


def test_a_turn_writes_only_its_new_blocks_and_sessions_share_a_prefix(model, tmp_path):
    engine = engine_for(model, tmp_path)
    stats = engine.sessions.stats
    turn1 = run(engine, P1, "a")
    engine.sessions.flush()
    first = stats.blocks_written
    assert first == (len(P1) + len(turn1.output_ids) - 1) // 5 == len(files(tmp_path, "blocks"))
    run(engine, P1 + turn1.output_ids + USER2, "a")
    engine.sessions.flush()
    read = len(P1) + len(turn1.output_ids) + len(USER2) + 6
    assert stats.blocks_written == read // 5  # the first turn's blocks were not written again
    # Another session with the same first 13 tokens shares their two blocks, in memory and on disk.
    before = len(files(tmp_path, "blocks"))
    run(engine, P1 + [9, 9, 9], "b")
    engine.sessions.flush()
    # 22 tokens read: 4 blocks, of which the first two (tokens 0-9) were already stored.
    assert len(files(tmp_path, "blocks")) == before + 2
    assert len(files(tmp_path, "manifests")) == 2 and len(files(tmp_path, "slots")) == 2
    references = sum(len(e.blocks) for e in engine.sessions.list())
    assert references == len(files(tmp_path, "blocks")) + 2


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
    assert engine.stats().blocks["device", "used"] == 0


def test_a_durable_turn_is_on_disk_when_its_output_is_final(model, tmp_path):
    engine = engine_for(model, tmp_path)
    seq = engine.add_request(P1, GREEDY, session_id="d")
    finals = []
    while engine.has_unfinished():
        finals += [o for o in engine.step() if o.finished]
    assert finals[0].persisted is not None
    entry = finals[0].persisted.result(timeout=30)
    assert entry.num_tokens == seq.num_computed_tokens and (tmp_path / "manifests" / "d.json").is_file()
    lazy = engine_for(model, tmp_path / "async", durability="async")
    seq = lazy.add_request(P1, GREEDY, session_id="d")
    while lazy.has_unfinished():
        assert all(o.persisted is None for o in lazy.step())


def test_a_session_whose_blocks_another_session_stored_first_resumes_whole(model, tmp_path):
    # Found by the soak: "b" shares its prefix with "a", whose blocks the store already holds, so
    # b's turn hands none of them to the store again. Resuming b (cached in memory, the store's
    # blocks not) must still read all of them, not restart at the first one the memory lacks.
    engine = engine_for(model, tmp_path)
    turn1 = run(engine, P1 + USER2, "a")
    engine.sessions.flush()
    engine = engine_for(model, tmp_path)  # a restart: the store holds a's blocks, the memory nothing
    first = run(engine, P1 + USER2, "b")
    engine.sessions.flush()
    p2 = P1 + USER2 + first.output_ids + USER2
    second = run(engine, p2, "b")
    assert second.num_reused_tokens == len(P1 + USER2) + len(first.output_ids) - 1  # the whole saved turn
    assert second.output_ids == fresh_output(model, p2)
    assert turn1.output_ids == first.output_ids


DAMAGE = ["block_truncated", "block_flipped", "block_missing", "slot_flipped", "manifest_flipped"]


@pytest.mark.parametrize("damage", DAMAGE)
def test_damage_resumes_from_the_longest_good_prefix(model, tmp_path, damage):
    engine = engine_for(model, tmp_path)
    turn1 = run(engine, P1 + USER2, "bad")        # 21 tokens read (+6 sampled): 5 blocks
    run(engine, [1] + P1 + USER2, "good")    # shares no block with "bad"
    engine.sessions.flush()
    blocks = engine.sessions.index.get("bad").blocks
    manifest = tmp_path / "manifests" / "bad.json"
    slot = tmp_path / "slots" / engine.sessions.index.get("bad").slot
    target = {"block": engine.sessions.backend.path("block", blocks[2]), "slot": slot,
              "manifest": manifest}[damage.split("_")[0]]
    data = bytearray(target.read_bytes())
    if damage.endswith("truncated"):
        target.write_bytes(bytes(data[: len(data) // 2]))
    elif damage.endswith("flipped"):
        data[-3] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    engine = engine_for(model, tmp_path)  # a restart: nothing in memory
    p2 = P1 + USER2 + turn1.output_ids + USER2
    seq = run(engine, p2, "bad")
    good_blocks = {"block": 2, "slot": 5, "manifest": 0}[damage.split("_")[0]]
    assert seq.num_reused_tokens == good_blocks * 5
    assert seq.output_ids == fresh_output(model, p2)  # never a wrong answer
    assert sum(engine.sessions.stats.integrity_errors.values()) == 1
    engine.sessions.flush()
    seq = run(engine, [1] + P1 + USER2 + [1, 2], "good")   # the others keep working
    assert seq.num_reused_tokens == 20


def test_a_session_of_another_model_is_refused(model, tmp_path):
    mine = engine_for(model, tmp_path)
    run(mine, P1, "mine")
    mine.sessions.flush()
    other = tiny_model(seed=5, memory="gla", aggregation="grm")
    engine = LLMEngine(other, CONFIG, SessionStore(other.fingerprint, tmp_path))
    with pytest.raises(SessionError) as err:
        engine.add_request(P1 + USER2, GREEDY, session_id="mine")
    assert err.value.code == "wrong_model"


def test_a_v1_session_file_is_converted_on_first_use(model, tmp_path):
    old = LLMEngine(model, CONFIG, SessionStore(model.fingerprint))
    seq = run(old, P1 + USER2, "legacy")
    # The state as the v1 store saved it: every block and the slot, in one file.
    saved = old.sessions.get("legacy")
    from engine.sessions import stack_blocks
    write_v1(tmp_path, "legacy", saved.tokens, stack_blocks(saved.blocks), saved.slot, model.fingerprint)
    engine = engine_for(model, tmp_path)
    assert [e.session_id for e in engine.sessions.list()] == ["legacy"]
    p2 = P1 + USER2 + seq.output_ids + USER2
    turn2 = run(engine, p2, "legacy")
    assert turn2.num_reused_tokens == len(saved.tokens) and turn2.output_ids == fresh_output(model, p2)
    engine.sessions.flush()
    assert not list(tmp_path.glob("*.session.safetensors")) and (tmp_path / "manifests" / "legacy.json").is_file()
    assert engine.sessions.stats.converted_v1 == 1


def test_saved_session_survives_kill_9(model, tmp_path):
    # A separate process builds the same tiny model (same seed, same fingerprint), saves a
    # session, and is killed with SIGKILL as soon as the turn's output is final.
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.getcwd()!r})
        from tests.test_sessions import CONFIG, GREEDY, P1
        from tests.helpers import tiny_model
        from engine.llm_engine import LLMEngine
        from engine.sessions import SessionStore
        model = tiny_model(arch={model.config.arch!r}, memory={model.config.memory!r}, aggregation="grm")
        engine = LLMEngine(model, CONFIG, SessionStore(model.fingerprint, {str(tmp_path / 'sessions')!r}))
        seq = engine.add_request(P1, GREEDY, session_id="crash")
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    out.persisted.result()  # what the server waits for before the response ends
        print("saved", *seq.output_ids, flush=True)
        import time; time.sleep(60)
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


def test_memory_tier_and_store_limits_evict_least_recently_used(model, tmp_path):
    limits = SessionLimits(max_memory_sessions=2, max_store_sessions=3)
    engine = engine_for(model, tmp_path, limits)
    for name in ["s1", "s2", "s3", "s4"]:
        run(engine, [ord(name[1]) % 61] + P1, name)
    store = engine.sessions
    store.flush()
    assert sorted(store.memory.sessions) == ["s3", "s4"]
    assert sorted(e.session_id for e in store.list()) == ["s2", "s3", "s4"]  # s1: LRU, evicted
    assert store.stats.evictions["store"] == 1 and store.memory.evictions >= 2
    assert not (tmp_path / "manifests" / "s1.json").exists()
    assert len(files(tmp_path, "blocks")) == 3 * 4  # s1's blocks were collected (each session has 4)
    assert {e.session_id: e.tier for e in store.list()} == {"s2": "store", "s3": "memory", "s4": "memory"}
    assert store.get("s2") is not None and store.delete("s2") and store.get("s2") is None
    assert len(files(tmp_path, "blocks")) == 2 * 4 and len(files(tmp_path, "slots")) == 2
    with pytest.raises(SessionError, match="session id must be"):
        store.get("../etc/passwd")


def test_a_failed_session_write_is_reported_not_fatal(model, tmp_path):
    engine = engine_for(model, tmp_path)
    (tmp_path / "manifests" / "blocked.json").mkdir()  # the rename onto it must fail
    seq = engine.add_request(P1, GREEDY, session_id="blocked")
    finals = []
    while engine.has_unfinished():
        finals += [o for o in engine.step() if o.finished]
    with pytest.raises(OSError):
        finals[0].persisted.result(timeout=30)
    assert engine.sessions.stats.write_errors == 1 and "blocked" in engine.sessions.stats.recent_write_errors[-1]
    assert not list(tmp_path.rglob("*.tmp"))  # no half-written file left behind
    assert seq.output_ids  # the turn itself was answered
    run(engine, P1, "fine")  # and the engine goes on
    engine.sessions.flush()
    assert (tmp_path / "manifests" / "fine.json").is_file()


def test_two_stores_on_one_directory_never_advance_a_session_at_once(model, tmp_path):
    a = SessionStore(model.fingerprint, tmp_path, lease_s=0.6)
    b = SessionStore(model.fingerprint, tmp_path, lease_s=0.6)
    a.acquire("x")
    with pytest.raises(SessionError) as err:
        b.acquire("x")
    assert err.value.code == "busy"
    a.release("x")
    a.flush()
    b.acquire("x")            # free once released
    b._closed.set()           # b "crashes": its lease is no longer renewed
    with pytest.raises(SessionError):
        a.acquire("x")
    import time
    time.sleep(0.8)
    a.acquire("x")            # ...and runs out by itself


def test_two_replicas_on_one_redis_continue_each_others_sessions(model, tmp_path):
    from tests.redis_helpers import redis_server
    with redis_server(tmp_path) as url:
        a, b = engine_for(model, url), engine_for(model, url)
        turn1 = run(a, P1, "shared")
        a.sessions.flush()
        p2 = P1 + turn1.output_ids + USER2
        turn2 = run(b, p2, "shared")                 # the next turn, on the other replica
        assert turn2.num_reused_tokens == len(P1) + len(turn1.output_ids) - 1
        assert turn2.output_ids == fresh_output(model, p2)
        b.sessions.flush()
        p3 = p2 + turn2.output_ids + USER2
        turn3 = run(a, p3, "shared")                 # a's cached copy is stale: it reads b's turn
        assert turn3.num_reused_tokens == len(p2) + len(turn2.output_ids) - 1
        assert turn3.output_ids == fresh_output(model, p3)
        a.add_request(p3, GREEDY, session_id="held")
        with pytest.raises(SessionError) as err:     # held by a: b must not advance it meanwhile
            b.add_request(p3, GREEDY, session_id="held")
        assert err.value.code == "busy"
        assert sorted(e.session_id for e in b.sessions.list()) == ["shared"]


def test_a_lease_left_by_a_dead_process_of_this_host_is_taken_at_once(model, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from engine.sessions import lease_owner_id
    ghost = SessionStore(model.fingerprint, tmp_path, owner=lease_owner_id().replace(f"/{os.getpid()}/",
                                                                                     f"/{dead.pid}/"))
    ghost.acquire("x")
    ghost._closed.set()
    alive = SessionStore(model.fingerprint, tmp_path)
    assert alive.backend.acquire_lease("y", "other-host/1/n", 30)
    with pytest.raises(SessionError):
        alive.acquire("y")  # held by a process of another host: only its expiry frees it
    SessionStore(model.fingerprint, tmp_path, lease_s=30).acquire("x")  # the dead process's lease is broken
    from engine.sessions import owner_is_dead
    other_namespace = lease_owner_id().split("/")
    other_namespace[1], other_namespace[2] = "0000.1", str(dead.pid)
    assert not owner_is_dead("/".join(other_namespace) + "/t")  # another container's pids are not ours


def test_a_replica_that_lost_its_lease_cannot_overwrite_the_turn_of_the_one_that_took_over(model, tmp_path):
    import time
    a_engine, b_engine = engine_for(model, tmp_path, lease_s=0.4), engine_for(model, tmp_path, lease_s=30)
    a_engine.sessions._closed.set()                 # a stalls: its lease is not renewed
    turn_a = a_engine.add_request(P1, GREEDY, session_id="s")  # a holds "s"...
    time.sleep(0.6)                                  # ...past its lease's expiry
    turn_b = run(b_engine, P1 + [9, 9], "s")         # b takes the session over and saves its turn
    b_engine.sessions.flush()
    while a_engine.has_unfinished():                 # a wakes up and finishes its stale turn
        finals = [o for o in a_engine.step() if o.finished]
    with pytest.raises(SessionError) as err:
        finals[0].persisted.result(timeout=30)
    assert err.value.code == "busy" and turn_a.output_ids
    saved = b_engine.sessions.get("s")
    assert saved.tokens == (P1 + [9, 9] + turn_b.output_ids)[:len(saved.tokens)]  # b's turn stands
    assert SessionStore(model.fingerprint, tmp_path).get("s").tokens == saved.tokens


def test_the_store_limits_never_evict_a_session_another_replica_holds(model, tmp_path):
    a = engine_for(model, tmp_path, SessionLimits(max_store_sessions=1))
    other = SessionStore(model.fingerprint, tmp_path)
    run(a, P1, "old")
    a.sessions.flush()
    other.acquire("old")                             # another replica is in a turn on "old"
    run(a, [5] + P1, "new")
    a.sessions.flush()
    assert (tmp_path / "manifests" / "old.json").is_file()  # over the limit, but held: spared
    other.release("old")
    other.flush()
    run(a, [6] + P1, "newer")
    a.sessions.flush()
    assert sorted(p.stem for p in (tmp_path / "manifests").iterdir()) == ["newer"]


def test_a_collection_spares_the_blocks_of_writes_still_queued(model, tmp_path):
    import threading
    engine = engine_for(model, tmp_path)
    store = engine.sessions
    run(engine, P1, "first")
    store.flush()
    saved, written = store.get("first"), store.stats.blocks_written
    keys = list(store.index.get("first").blocks)
    gate = threading.Event()
    store.writer.submit(gate.wait)                    # hold the writer while both jobs queue up
    deleting = threading.Thread(target=store.delete, args=("first",))
    deleting.start()
    while store.writer.jobs.qsize() < 1:
        time.sleep(0.01)
    # A second session of the same prefix, whose blocks the store holds: it sends none of them.
    assert store.unknown_blocks("second", keys) == []
    write = store.put("second", saved.tokens, keys, {}, saved.slot)
    gate.set()
    deleting.join()
    write.result(timeout=30)
    assert store.stats.blocks_collected == 0 and store.stats.blocks_written == written
    assert store.get("second").num_checkpoints == len(keys)


def test_prefetch_reads_a_session_into_memory_but_never_caches_damage(model, tmp_path):
    engine = engine_for(model, tmp_path)
    run(engine, P1, "s")
    engine.sessions.flush()
    store = SessionStore(model.fingerprint, tmp_path)
    store.prefetch("s")
    assert "s" in store.memory.sessions
    blocks = store.index.get("s").blocks
    last = store.backend.path("block", blocks[-1])
    last.write_bytes(last.read_bytes()[:10])
    store = SessionStore(model.fingerprint, tmp_path)
    store.prefetch("s")
    store.prefetch("nope")
    assert "s" not in store.memory.sessions and not store.stats.integrity_errors
    assert store.get("s").num_checkpoints == len(blocks) - 1 and store.stats.integrity_errors["truncated"] == 1


def _block(value):
    return {"ckpt": torch.full((2, 4), float(value))}


def test_a_write_cut_short_by_a_vanished_block_leaves_nothing_pinned():
    from engine.store.backend import MemoryBackend
    store = SessionStore("f" * 32, MemoryBackend())
    store.acquire("s")
    store.put("s", [1, 2, 3], ["a", "gone", "c"], {"a": _block(1), "c": _block(3)}, None).result()
    assert store.get("s").num_checkpoints == 1 and not store.pinned


def test_prefetch_never_replaces_a_state_whose_write_is_queued():
    import threading

    from engine.store.backend import MemoryBackend
    store = SessionStore("f" * 32, MemoryBackend())
    slot = {"online": torch.ones(2, 3)}
    store.acquire("s")
    store.put("s", [1, 2], ["a"], {"a": _block(1)}, slot).result()
    gate = threading.Event()
    store.writer.submit(gate.wait)         # the next write stays queued (async durability)
    store.acquire("s")
    store.put("s", [1, 2, 3, 4], ["a", "b"], {"b": _block(2)}, slot)
    store.prefetch("s")                    # the next turn's request arrives meanwhile
    assert store.get("s").tokens == [1, 2, 3, 4]
    gate.set()
    store.flush()


def test_redis_collects_orphans_once_their_grace_has_passed(tmp_path):
    from tests.redis_helpers import redis_server
    with redis_server(tmp_path) as url:
        store = SessionStore("f" * 32, url, gc_grace_s=1.5)
        store.acquire("s1")
        store.put("s1", [1, 2], ["k1", "k2"], {"k1": _block(1), "k2": _block(2)}, None).result()
        store.delete("s1")
        store.flush()
        assert set(store.backend.list("block")) == {"k1", "k2"}  # within the grace: spared
        time.sleep(2.0)
        store.list()                       # a scan reads every manifest: no blob may look fresh for it
        store._collect(store.gc_grace_s)
        assert store.backend.list("block") == {} and store.stats.blocks_collected == 2
        store.close()
