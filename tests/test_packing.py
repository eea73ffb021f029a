"""Which prefill chunks share a forward (engine/packing.py): no torch."""

from engine.packing import pack_by_length


def test_equal_chunks_share_one_forward():
    assert pack_by_length([256, 256, 256, 256]) == [[0, 1, 2, 3]]


def test_every_chunk_is_packed_once_longest_first():
    lengths = [5, 1024, 17, 1000, 64, 900, 1, 60]
    packs = pack_by_length(lengths)
    assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))
    for pack in packs:
        assert [lengths[i] for i in pack] == sorted((lengths[i] for i in pack), reverse=True)


def test_padding_stays_within_the_bound():
    lengths = [1024, 1000, 900, 64, 60, 17, 5, 1]
    for bound in (0.0, 0.25, 1.0):
        for pack in pack_by_length(lengths, bound):
            real = sum(lengths[i] for i in pack)
            assert lengths[pack[0]] * len(pack) <= (1 + bound) * real
    # a long chunk and a short one never pad the short one to the long one's length
    assert pack_by_length([1024, 8]) == [[0], [1]]
    assert pack_by_length([]) == []
