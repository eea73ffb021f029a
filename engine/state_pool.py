"""StatePool: bookkeeping for segment-checkpoint blocks (PagedAttention for compressed states).

One block holds one segment checkpoint of one sequence, all layers (the ModelRunner owns the
tensors; this file imports no torch). Blocks live in tiers (device, host), each a fixed
number of slots with its own free list.

Prefix reuse: a finished block is published under a hash chained over its segment's token ids
(`hash(parent_hash, segment_tokens)`), so a later sequence whose first n segments have the same
tokens finds those n blocks and shares them. Checkpoints are written once and never change, so
sharing is copy-on-write in the trivial sense: nobody writes to a shared block.

Reference counts: a block is in use while a sequence holds it. At zero, a published block stays
cached (an LRU of unreferenced blocks) until its slot is needed; an unpublished one is freed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

TIERS = ("device", "host")


class PoolExhausted(RuntimeError):
    """No free or evictable block is left in a tier."""


def chain_hash(parent: str | None, segment_tokens: Sequence[int]) -> str:
    """The prefix-reuse key of a segment: depends on every token before it, via `parent`.
    A 128-bit BLAKE2b digest, the same in every process and on every machine, so it also
    addresses the segment's checkpoint in a session store shared by replicas."""
    h = hashlib.blake2b(bytes.fromhex(parent) if parent else b"", digest_size=16)
    h.update(array("q", segment_tokens).tobytes())
    return h.hexdigest()


def salt_root(salt: str) -> str:
    return hashlib.blake2b(b"mcserve-cache-salt\0" + salt.encode(), digest_size=16).hexdigest()


def segment_hashes(tokens: Sequence[int], segment_size: int, known: Sequence[str] = (), salt: str = "") -> list[str]:
    """Chained hashes of every *complete* segment of `tokens`; `known` are the hashes of its
    first segments, already computed (extended, not recomputed). A `salt` (a tenant's, vLLM's
    `cache_salt`) starts the chain elsewhere, so that its prefixes are found only with the same salt."""
    hashes = list(known)
    parent = hashes[-1] if hashes else (salt_root(salt) if salt else None)
    for start in range(len(hashes) * segment_size, len(tokens) - segment_size + 1, segment_size):
        parent = chain_hash(parent, tokens[start:start + segment_size])
        hashes.append(parent)
    return hashes


@dataclass
class Block:
    block_id: int
    tier: str
    ref_count: int = 0
    block_hash: str | None = None


class TierAllocator:
    """Fixed slots of one tier: free list, reference counts, and an LRU of cached blocks."""

    def __init__(self, tier: str, num_blocks: int):
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.tier = tier
        self.blocks = [Block(i, tier) for i in range(num_blocks)]
        self.free_ids: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives 0 first
        self.cached: OrderedDict[int, None] = OrderedDict()  # unreferenced, published; LRU first
        self.by_hash: dict[str, int] = {}
        self.evictions = 0

    # --- counts ---------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Slots that can be handed out now: free, plus cached ones that may be evicted."""
        return len(self.free_ids) + len(self.cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_ids) - len(self.cached)

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    # --- allocation -----------------------------------------------------------------------
    def allocate(self) -> int:
        """A fresh block with ref_count 1; evicts the least recently used cached block if needed."""
        if self.free_ids:
            block_id = self.free_ids.pop()
        elif self.cached:
            block_id, _ = self.cached.popitem(last=False)
            self._unpublish(block_id)
            self.evictions += 1
        else:
            raise PoolExhausted(f"no free {self.tier} block ({self.num_blocks} in use)")
        self.blocks[block_id].ref_count = 1
        return block_id

    def can_allocate(self, n: int) -> bool:
        return self.num_free >= n

    def share(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.cached.pop(block_id)  # a cache hit brings it back into use
        block.ref_count += 1

    def release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count <= 0:
            raise ValueError(f"{self.tier} block {block_id} released more often than taken")
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.block_hash is not None:
                self.cached[block_id] = None
            else:
                self.free_ids.append(block_id)

    # --- prefix reuse ---------------------------------------------------------------------
    def publish(self, block_id: int, block_hash: str) -> None:
        """Make a written block findable by its chain hash (first writer wins)."""
        block = self.blocks[block_id]
        if block.block_hash is None and block_hash not in self.by_hash:
            block.block_hash = block_hash
            self.by_hash[block_hash] = block_id

    def lookup(self, hashes: Iterable[str]) -> list[int]:
        """Block ids of the longest cached prefix of `hashes`, each shared (ref taken)."""
        found = []
        for h in hashes:
            block_id = self.by_hash.get(h)
            if block_id is None:
                break
            self.share(block_id)
            found.append(block_id)
        return found

    def _unpublish(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None:
            del self.by_hash[block.block_hash]
            block.block_hash = None


class StatePool:
    """The tiers together, with a move (swap) between them.

    `move(ids, src, dst)` reserves slots in `dst`, releases them in `src`, and returns the
    (src_id, dst_id) pairs the ModelRunner must copy *before* the source slots are reused.
    """

    def __init__(self, device_blocks: int, host_blocks: int = 0):
        self.tiers = {"device": TierAllocator("device", device_blocks), "host": TierAllocator("host", host_blocks)}
        self.prefix_queries = 0   # segments looked up
        self.prefix_hits = 0      # segments found

    def __getitem__(self, tier: str) -> TierAllocator:
        return self.tiers[tier]

    @property
    def device(self) -> TierAllocator:
        return self.tiers["device"]

    def lookup_prefix(self, hashes: list[str]) -> list[int]:
        found = self.device.lookup(hashes)
        self.prefix_queries += len(hashes)
        self.prefix_hits += len(found)
        return found

    def move(self, block_ids: list[int], src: str, dst: str) -> list[tuple[int, int]]:
        source, target = self.tiers[src], self.tiers[dst]
        if not target.can_allocate(len(block_ids)):
            raise PoolExhausted(f"cannot move {len(block_ids)} blocks to {dst}: {target.num_free} free")
        pairs = [(b, target.allocate()) for b in block_ids]
        for b in block_ids:
            source.release(b)
        return pairs

    def release_all(self, block_ids: Iterable[int], tier: str = "device") -> None:
        for b in block_ids:
            self.tiers[tier].release(b)
