"""Triton cached read-out against its torch reference: every aggregation, odd sizes, ragged block
tables (including empty ones), fp32 and bf16 storage. Interpreter on the CPU, real on CUDA."""

import pytest
import torch

from mckernels.cached_readout import MODES, cached_readout_ref
from mckernels.cached_readout.triton_kernel import cached_readout_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def case(dk, dv, lengths, storage, seed=0, N=12, H=2):
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(N, H, dk, dv, generator=g).to(storage)
    summaries = torch.randn(N, H, dk, generator=g) * 0.5
    max_n = max(max(lengths), 1)
    tables = torch.stack([torch.randperm(N, generator=g)[:max_n] for _ in lengths]).to(torch.int32)
    B = len(lengths)
    q = torch.nn.functional.normalize(torch.randn(B, H, dk, generator=g), dim=-1)
    u = torch.randn(B, H, dk, generator=g) * 2
    r_online = torch.randn(B, H, generator=g)
    return [t.to(DEVICE) for t in (pool, summaries, tables, torch.tensor(lengths), q, u, r_online)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dk,dv,lengths", [(6, 10, [3, 0, 5]), (16, 70, [7, 2]), (12, 12, [1])])
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_cached_readout_matches_reference(mode, dk, dv, lengths, storage):
    args = case(dk, dv, lengths, storage)
    ref_y, ref_g = cached_readout_ref(*args, mode=mode, top_k=2, scale=dk ** -0.5)
    y, g = cached_readout_triton(*args, mode=mode, top_k=2, scale=dk ** -0.5)
    assert torch.allclose(y, ref_y, atol=1e-4), (y - ref_y).abs().max()
    assert torch.allclose(g, ref_g, atol=1e-5)
    if 0 in lengths:
        b = lengths.index(0)
        assert torch.equal(y[b], torch.zeros_like(y[b])) and torch.equal(g[b], torch.ones_like(g[b]))


def test_ssc_with_enough_top_k_is_grm():
    args = case(8, 8, [4, 3], torch.float32, seed=3)
    grm = cached_readout_triton(*args, mode="grm", top_k=2, scale=0.3)
    ssc = cached_readout_triton(*args, mode="ssc", top_k=4, scale=0.3)
    assert torch.allclose(grm[0], ssc[0], atol=1e-6) and torch.allclose(grm[1], ssc[1], atol=1e-6)
    ssc1 = cached_readout_triton(*args, mode="ssc", top_k=1, scale=0.3)
    assert not torch.allclose(grm[0], ssc1[0], atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("splits", [2, 3, 7])
def test_split_block_tables_add_up(mode, splits):
    """Flash-decoding split: any number of programs per sequence gives the unsplit result,
    including splits that get no checkpoints at all (lengths 0 and 2 with 7 splits)."""
    args = case(10, 20, [9, 0, 2, 5], torch.float32, seed=5)
    ref_y, ref_g = cached_readout_ref(*args, mode=mode, top_k=2, scale=0.4)
    y, g = cached_readout_triton(*args, mode=mode, top_k=2, scale=0.4, splits=splits)
    assert torch.allclose(y, ref_y, atol=1e-4), (y - ref_y).abs().max()
    assert torch.allclose(g, ref_g, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_tables_longer_than_a_score_tile(mode, storage):
    """Scores are taken in tiles of SCORE_TILE checkpoints with an online max; ssc's top-k must
    find its picks across tiles. 70 checkpoints = 3 tiles, the last one partial."""
    args = case(5, 9, [70, 33, 1], storage, seed=7, N=80, H=3)
    ref_y, ref_g = cached_readout_ref(*args, mode=mode, top_k=3, scale=0.6)
    y, g = cached_readout_triton(*args, mode=mode, top_k=3, scale=0.6)
    assert torch.allclose(y, ref_y, atol=1e-4), (y - ref_y).abs().max()
    assert torch.allclose(g, ref_g, atol=1e-5)


def test_ssc_ties_pick_the_earliest_checkpoints():
    """Equal scores (here: identical summaries) are broken towards the lowest table index, as
    torch.topk on the reference does; a different pick would read other checkpoints."""
    pool, summaries, tables, lengths, q, u, r_on = case(4, 6, [6], torch.float32, seed=11)
    summaries[:] = summaries[0]
    ref_y, ref_g = cached_readout_ref(pool, summaries, tables, lengths, q, u, r_on, mode="ssc", top_k=2, scale=1.0)
    for splits in (1, 3):
        y, g = cached_readout_triton(pool, summaries, tables, lengths, q, u, r_on, mode="ssc", top_k=2,
                                     scale=1.0, splits=splits)
        assert torch.allclose(y, ref_y, atol=1e-5) and torch.allclose(g, ref_g, atol=1e-6)


def test_split_heuristic_fills_the_gpu_only_when_needed():
    from mckernels.cached_readout.triton_kernel import num_splits
    assert num_splits(256, 16, 1, 32) == 1          # 4096 programs: enough already
    assert num_splits(1, 16, 1, 32) == 8            # 16 programs: split, 4 checkpoints each
    assert num_splits(1, 16, 1, 3) == 1             # too few checkpoints to share
    assert num_splits(4, 16, 1, 1000) == 8          # 64 programs x 8 = TARGET_PROGRAMS
