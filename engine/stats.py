"""Snapshots of the engine's and the session store's state, for /metrics and /health.

The engine's scheduler and pools change on the engine thread, and the store's index on its
writer thread; a reader on another thread must not walk them. Instead, each publishes an
immutable snapshot under its own lock (the engine once per step, as vLLM's `SchedulerStats`),
and readers only ever see whole snapshots. Plain data, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TIERS = ("device", "host")
BLOCK_STATES = ("used", "cached", "free")


@dataclass(frozen=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    num_swapped: int = 0
    num_free_slots: int = 0
    blocks: dict[tuple[str, str], int] = field(default_factory=dict)  # (tier, state) -> blocks
    block_nbytes: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    block_evictions: int = 0
    num_swapped_out: int = 0
    num_swapped_in: int = 0
    num_recomputed: int = 0
    num_steps: int = 0


@dataclass(frozen=True)
class StoreStatsSnapshot:
    backend: str = ""
    sessions: dict[str, int] = field(default_factory=dict)        # tier (memory, store) -> sessions
    session_bytes: dict[str, int] = field(default_factory=dict)   # tier -> bytes
    physical_bytes: int = 0
    logical_bytes: int = 0
    blobs: dict[str, int] = field(default_factory=dict)           # block, slot -> count
    bytes_written: int = 0
    blocks_collected: int = 0
    slots_collected: int = 0
    evictions: dict[str, int] = field(default_factory=dict)       # memory, store -> sessions evicted
    integrity_errors: dict[str, int] = field(default_factory=dict)
    unavailable_errors: int = 0
    unavailable: str | None = None   # the store's last error, while its calls fail
    write_errors: int = 0
    failing_writes: int = 0          # write errors since the last write that succeeded
    recent_write_errors: tuple[str, ...] = ()
    write_seconds: tuple[int, ...] = ()   # per bucket of WRITE_BUCKETS, then +Inf
    write_seconds_sum: float = 0.0
