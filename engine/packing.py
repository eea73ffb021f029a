"""Which prefill chunks of a step share one forward (packed prefill). No torch.

A packed forward pads every chunk to the longest one, so chunks of very different lengths
waste work together: they are grouped, longest first, while the padding stays within
`max_padding` of the real tokens. Equal chunks (the common case: new prompts cut at the same
chunk size) always share one forward.
"""

from __future__ import annotations

MAX_PADDING = 0.25  # padded tokens a pack may add, as a share of its real tokens


def pack_by_length(lengths: list[int], max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Indices into `lengths`, grouped into packs; every index appears once."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    packs: list[list[int]] = []
    real = 0
    for i in order:
        if packs:
            pack = packs[-1]
            longest = lengths[pack[0]]
            if longest * (len(pack) + 1) <= (1 + max_padding) * (real + lengths[i]):
                pack.append(i)
                real += lengths[i]
                continue
        packs.append([i])
        real = lengths[i]
    return packs
