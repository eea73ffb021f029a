"""Segment-end copy in Triton: one program per (row, head, tile of dk*dv). Rows whose segment
goes on (end block -1) are masked out, so the step costs nothing for them and the launch has a
fixed shape (it runs inside the captured CUDA graph of a decode step, where which rows end a
segment is only known on the device)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _round_to_bf16_grid(x):
    """fp32 -> the nearest bf16 value (ties to even), still in fp32. The Triton interpreter's
    fp32 -> bf16 cast truncates; rounding first makes the cast exact everywhere, so checkpoints
    get the same bits as torch's `.to(torch.bfloat16)`."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _segment_end_kernel(online, slot_ids, end_blocks, ckpt_pool, H: tl.constexpr, SIZE: tl.constexpr,
                        BLOCK: tl.constexpr, RESET: tl.constexpr, TO_BF16: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    end = tl.load(end_blocks + b)
    mask = (offs < SIZE) & (offs * 0 + end >= 0)  # a vector, not & a scalar bool (triton 3.9's interpreter)
    slot = tl.cast(tl.load(slot_ids + b), tl.int64)
    src = online + (slot * H + h) * SIZE + offs
    M = tl.load(src, mask=mask, other=0.0)
    dst = ckpt_pool + (tl.cast(tl.maximum(end, 0), tl.int64) * H + h) * SIZE + offs
    if TO_BF16:
        M = _round_to_bf16_grid(M)
    tl.store(dst, M.to(ckpt_pool.dtype.element_ty), mask=mask)
    if RESET:
        tl.store(src, tl.zeros([BLOCK], dtype=tl.float32), mask=mask)


def segment_end_triton(online: torch.Tensor, slot_ids: torch.Tensor, end_blocks: torch.Tensor,
                       ckpt_pool: torch.Tensor, reset: bool) -> None:
    """Same contract as `segment_end_ref`."""
    B = slot_ids.shape[0]
    _, H, dk, dv = online.shape
    assert online.is_contiguous() and ckpt_pool.is_contiguous()
    block = min(BLOCK, triton.next_power_of_2(dk * dv))
    _segment_end_kernel[(B, H, triton.cdiv(dk * dv, block))](
        online, slot_ids.to(torch.int32), end_blocks.to(torch.int32), ckpt_pool, H=H, SIZE=dk * dv,
        BLOCK=block, RESET=reset, TO_BF16=ckpt_pool.dtype == torch.bfloat16)
