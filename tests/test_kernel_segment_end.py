"""Triton segment-end copy against its torch reference: only ending rows are copied (and reset),
bf16 storage, odd sizes. Interpreter on the CPU, real on CUDA."""

import pytest
import torch

from mckernels.segment_end import segment_end_ref
from mckernels.segment_end.triton_kernel import segment_end_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dk,dv", [(6, 10), (16, 16), (33, 40)])
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reset", [False, True])
def test_segment_end_matches_reference(dk, dv, storage, reset):
    g = torch.Generator().manual_seed(0)
    online = torch.randn(5, 3, dk, dv, generator=g).to(DEVICE)
    pool = torch.randn(9, 3, dk, dv, generator=g).to(storage).to(DEVICE)
    slot_ids = torch.tensor([4, 0, 2, 1], device=DEVICE)
    end_blocks = torch.tensor([7, -1, 3, -1], device=DEVICE)
    want_online, want_pool = online.clone(), pool.clone()
    segment_end_ref(want_online, slot_ids, end_blocks, want_pool, reset)
    segment_end_triton(online, slot_ids, end_blocks, pool, reset)
    assert torch.equal(online, want_online) and torch.equal(pool, want_pool)
    assert not torch.equal(pool[7], torch.zeros_like(pool[7]))
