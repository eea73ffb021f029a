"""Plain-torch reference of the segment-end copy (same signature as the Triton kernel).

online [S,H,dk,dv] fp32 slot pool; slot_ids [B]; end_blocks [B] (the block that receives row b's
checkpoint, or -1 when its segment goes on); ckpt_pool [N,H,dk,dv] (fp32 or bf16). In place.
"""

from __future__ import annotations

import torch


def segment_end_ref(online: torch.Tensor, slot_ids: torch.Tensor, end_blocks: torch.Tensor,
                    ckpt_pool: torch.Tensor, reset: bool) -> None:
    ends = (end_blocks >= 0).nonzero().flatten()
    if ends.numel() == 0:
        return
    slots = slot_ids[ends].long()
    ckpt_pool[end_blocks[ends].long()] = online[slots].to(ckpt_pool.dtype)
    if reset:
        online[slots] = 0
