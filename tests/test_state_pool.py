"""StatePool bookkeeping: allocation, reference counts, prefix reuse, LRU eviction, tier moves."""

import pytest

from engine.state_pool import PoolExhausted, StatePool, TierAllocator, chain_hash, segment_hashes


def test_allocate_and_release_return_every_block():
    tier = TierAllocator("device", 4)
    ids = [tier.allocate() for _ in range(4)]
    assert sorted(ids) == [0, 1, 2, 3] and tier.num_free == 0
    with pytest.raises(PoolExhausted, match="no free device block"):
        tier.allocate()
    for b in ids:
        tier.release(b)
    assert tier.num_free == 4 and tier.num_used == 0
    with pytest.raises(ValueError, match="released more often"):
        tier.release(ids[0])


def test_a_salt_starts_another_chain():
    plain, salted = segment_hashes(list(range(6)), 3), segment_hashes(list(range(6)), 3, salt="alice")
    assert not set(plain) & set(salted) and salted != segment_hashes(list(range(6)), 3, salt="bob")
    assert salted == segment_hashes(list(range(6)), 3, salted[:1], salt="alice")


def test_segment_hashes_chain_over_the_whole_prefix():
    a = segment_hashes([1, 2, 3, 4, 5, 6, 7], segment_size=3)
    b = segment_hashes([9, 2, 3, 4, 5, 6], segment_size=3)
    assert len(a) == 2 and len(b) == 2
    assert a[0] != b[0] and a[1] != b[1]  # same second segment, different history
    assert a == segment_hashes([1, 2, 3, 4, 5, 6], 3)
    assert a[1] == chain_hash(chain_hash(None, [1, 2, 3]), [4, 5, 6])


def test_published_blocks_are_shared_then_cached_then_evicted_lru():
    tier = TierAllocator("device", 3)
    hashes = segment_hashes(list(range(9)), 3)
    first = [tier.allocate() for _ in hashes]
    for b, h in zip(first, hashes):
        tier.publish(b, h)
    shared = tier.lookup(hashes[:2] + [12345])
    assert shared == first[:2] and [tier.blocks[b].ref_count for b in first] == [2, 2, 1]
    for b in first:
        tier.release(b)
    assert tier.num_used == 2 and tier.num_cached == 1
    for b in shared:
        tier.release(b)
    assert tier.num_used == 0 and tier.num_cached == 3 and tier.num_free == 3
    # Cached in release order (2, 0, 1); a hit on block 0 makes it the most recent.
    tier.release(*tier.lookup(hashes[:1]))
    evicted_order = [tier.allocate() for _ in range(3)]
    assert evicted_order == [first[2], first[1], first[0]]
    assert tier.evictions == 3 and tier.lookup(hashes) == []


def test_unpublished_blocks_go_straight_back_to_the_free_list():
    tier = TierAllocator("device", 2)
    b = tier.allocate()
    tier.release(b)
    assert tier.num_cached == 0 and len(tier.free_ids) == 2


def test_first_writer_wins_on_a_hash():
    tier = TierAllocator("device", 2)
    a, b = tier.allocate(), tier.allocate()
    tier.publish(a, 7)
    tier.publish(b, 7)
    assert tier.lookup([7]) == [a]


def test_move_between_tiers_keeps_counts_exact():
    pool = StatePool(device_blocks=3, host_blocks=2)
    ids = [pool.device.allocate() for _ in range(2)]
    pool.device.share(ids[0])  # another sequence holds block 0 too
    pairs = pool.move(ids, "device", "host")
    assert [src for src, _ in pairs] == ids
    assert pool["host"].num_used == 2
    assert pool.device.num_used == 1  # block 0 stays for its other holder
    extra = pool.device.allocate()
    with pytest.raises(PoolExhausted, match="cannot move 1 blocks to host"):
        pool.move([extra], "device", "host")
    assert pool.device.blocks[extra].ref_count == 1  # a failed move changes nothing
    pool.device.release(extra)
    back = pool.move([dst for _, dst in pairs], "host", "device")
    assert len(back) == 2 and pool["host"].num_used == 0


def test_prefix_counters():
    pool = StatePool(device_blocks=4)
    hashes = segment_hashes(list(range(12)), 4)
    for h in hashes[:2]:
        pool.device.publish(pool.device.allocate(), h)
    found = pool.lookup_prefix(hashes)
    assert len(found) == 2 and pool.prefix_queries == 3 and pool.prefix_hits == 2
