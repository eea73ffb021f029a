"""The store index and the memory tier: pure bookkeeping, no torch, no I/O."""

from engine.store.index import SessionEntry, SessionLimits, StoreIndex
from engine.store.memory_tier import CachedSession, MemoryTier


def entry(sid, blocks, last_used, slot=True):
    return SessionEntry(sid, 10, len(blocks), 100 * len(blocks), 0.0, last_used, tuple(blocks),
                        f"{sid}.slot" if slot else None, manifest_bytes=1)


def index_with(limits, *entries):
    index = StoreIndex(limits)
    for e in entries:
        index.add(e)
        for ref in e.refs():
            index.add_blob(ref, 100)
    return index


def test_shared_blocks_count_once_and_orphans_appear_when_the_last_reference_goes():
    index = index_with(SessionLimits(), entry("a", ["p0", "p1", "a2"], 1), entry("b", ["p0", "p1", "b2"], 2))
    assert index.physical_bytes == 100 * (4 + 2) + 2 and index.logical_bytes == 600
    index.remove("a")
    assert sorted(index.orphans()) == [("block", "a2"), ("slot", "a.slot")]
    index.add(entry("b", ["p0"], 3))  # b's new version drops two of its blocks
    assert ("block", "p1") in index.orphans() and ("block", "p0") not in index.orphans()


def test_victims_are_whole_sessions_lru_first_until_under_the_limits():
    sessions = [entry("old", ["s0", "o1"], 1), entry("mid", ["s0", "m1"], 2), entry("new", ["s0", "n1"], 3)]
    assert index_with(SessionLimits(max_store_sessions=2), *sessions).victims() == ["old"]
    # bytes: each session frees its own block and slot (200 + manifest); the shared block only with the last
    limited = index_with(SessionLimits(max_store_bytes=100 * 7 + 3 - 201), *sessions)
    assert limited.victims() == ["old"]
    assert index_with(SessionLimits(max_store_sessions=1), *sessions).victims(protected={"old"}) == ["mid", "new"]
    everything = index_with(SessionLimits(max_store_bytes=0), *sessions)
    assert everything.victims(protected={"new"}) == ["old", "mid"]


def test_touch_moves_a_session_to_the_recent_end():
    index = index_with(SessionLimits(max_store_sessions=1), entry("a", [], 1), entry("b", [], 2))
    index.touch("a", 5)
    assert index.victims() == ["b"]
    index.rebuild([entry("a", [], 1), entry("b", [], 2)], {})  # a scan that knows only the write times
    assert index.victims() == ["b"]                               # keeps a's later use


class FakeManifest:
    def __init__(self, blocks):
        self.blocks = blocks


def test_memory_tier_shares_blocks_and_evicts_lru_sessions():
    tier = MemoryTier(max_sessions=2, max_bytes=10_000)
    tier.put("a", CachedSession("d", FakeManifest(["p", "a1"]), "slot-a", 10), {"p": ("P", 100), "a1": ("A1", 100)})
    tier.put("b", CachedSession("d", FakeManifest(["p", "b1"]), "slot-b", 10), {"b1": ("B1", 100)})
    assert tier.nbytes == 300 + 20 and tier.block("p") == "P"
    tier.put("a", CachedSession("d2", FakeManifest(["p", "a1", "a2"]), "slot-a", 10), {"a2": ("A2", 100)})
    assert tier.nbytes == 400 + 20  # the new version kept the blocks it shares with the old one
    tier.put("c", CachedSession("d", FakeManifest(["c1"]), None, 0), {"c1": ("C1", 100)})
    assert list(tier.sessions) == ["a", "c"] and tier.evictions == 1  # b was least recently used
    assert tier.block("b1") is None and tier.block("p") == "P"
    small = MemoryTier(max_sessions=10, max_bytes=250)
    small.put("x", CachedSession("d", FakeManifest(["x1"]), None, 0), {"x1": ("X", 200)})
    small.put("y", CachedSession("d", FakeManifest(["y1"]), None, 0), {"y1": ("Y", 200)})
    assert list(small.sessions) == ["y"] and small.nbytes == 200
