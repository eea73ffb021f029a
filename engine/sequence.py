"""A request's sequence: its tokens, progress, and where its state lives. No torch here."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from .params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"     # queued, holds no slot
    RUNNING = "running"     # holds an online slot and device blocks
    SWAPPED = "swapped"     # state moved to host memory under pressure; resumes later
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: queues compare sequences by object
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    session_id: str | None = None
    cache_salt: str = ""                  # prefixes are shared only between sequences of the same salt
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0          # tokens whose effect is in the state
    block_table: list[int] = field(default_factory=list)  # one checkpoint block per finished segment
    block_hashes: list[str] = field(default_factory=list)  # chain hashes of its first segments (a cache)
    slot: int | None = None               # online-state slot while RUNNING
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None      # "stop", "length", "abort"
    num_reused_tokens: int = 0            # prompt tokens not recomputed (prefix hit, session)
    resume_blocks: int | None = None      # a resumed session: saved blocks to install on admission
    group_id: str = ""                    # the request of n > 1 samples this belongs to
    index: int = 0                        # which of the n samples
    wait_for: Sequence | None = None      # admit only after this one has read the prompt
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    resume_seconds: float | None = None   # time to load the saved session, when resumed

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __post_init__(self) -> None:
        self.group_id = self.group_id or self.request_id

    def next_tokens(self, limit: int) -> list[int]:
        """The next uncomputed tokens, at most `limit`."""
        return self.all_ids[self.num_computed_tokens:self.num_computed_tokens + limit]
