"""What the soak's completed turns oblige the session store to keep, and the checks of it.

A session saves what it has read: `all_ids[:num_computed_tokens]` (engine/llm_engine.py
`_save_session`), the prompt and every sampled token but the last (it was sampled, not read yet).
So once a turn's response has completed (with `--session-durability sync`, only after its session
write landed), the store must show at least `prompt + completion - 1` tokens for that session:
the strong bound. It holds until the next request on the session starts.

A later request that did not complete (aborted, disconnected, cut by a kill) may have replaced the
saved state with one of its own, resumed from the last checkpoint at or before where its prompt
left the saved tokens. The soak's next prompt always extends the last completed turn's
conversation, whose prompt text is stable (only the newest reply can re-encode differently: the
tiny model emits invalid UTF-8), so that point is at or after the completed turn's prompt: the
store must keep at least its prompt rounded down to a checkpoint, the weak bound. A follow-up turn
must read at least that much back (`cached_tokens`) rather than start over.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

# A BPE tokenizer may merge the last token or two of a prompt with the reply that follows it.
BOUNDARY_SLACK = 2


@dataclass
class Turn:
    """A turn whose response completed."""
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Session:
    id: str | None             # None: a request without a session (nothing owed)
    kind: str                  # "chat" or "completion": one endpoint per conversation
    via_header: bool           # X-Session-Id rather than the session_id field
    turns_left: int
    history: list[dict] | str  # chat messages, or the completion prompt so far
    last: Turn | None = None   # the last completed turn
    clean: bool = True         # no request has touched the session since `last`
    completed: int = 0
    deleted: bool = False
    events: list = field(default_factory=list)  # what each request on it came to (for a violation's report)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one request (or check) at a time

    def required_tokens(self, segment: int) -> int:
        """The fewest tokens the store may show for this session now."""
        if self.last is None:
            return 0
        if self.clean:
            return self.last.prompt_tokens + self.last.completion_tokens - 1
        return self.required_cached(segment)

    def required_cached(self, segment: int) -> int:
        """The fewest prompt tokens a follow-up turn may read back from the saved state."""
        if self.last is None:
            return 0
        return max(0, self.last.prompt_tokens - BOUNDARY_SLACK) // segment * segment

    def log(self, event: dict) -> None:
        self.events = [*self.events[-19:], event]

    def touched(self) -> None:
        """A request on the session did not complete: what it saved is unknown."""
        self.clean = False

    def completed_turn(self, turn: Turn) -> None:
        self.last, self.clean, self.completed = turn, True, self.completed + 1


@dataclass
class Violation:
    session: str
    check: str      # "card" (GET /v1/sessions/{id}) or "resume" (a follow-up's cached tokens)
    when: str       # "traffic", "restart N", "final"
    turn: int       # which completed turn of the session (1, 2, ...) went missing
    required: int
    found: int | None
    detail: str = ""
    events: list = field(default_factory=list)  # the session's requests up to the violation


class Ledger:
    def __init__(self, segment: int):
        self.segment = segment
        self.sessions: dict[str, Session] = {}  # the live ones
        self.created = 0
        self.deleted_turns = 0  # completed turns of the sessions deleted since
        self.violations: list[Violation] = []
        self.card_checks = 0
        self.resume_checks = 0
        self.skipped_checks = 0  # cut by a kill: the next round checks them again
        self.card_errors: list[dict] = []  # a card request answered neither 200 nor 404

    def add(self, session: Session) -> None:
        self.sessions[session.id] = session
        self.created += 1

    def forget(self, session: Session) -> None:
        """The session was deleted (DELETE /v1/sessions/{id}): nothing to check any more."""
        session.deleted = True
        self.sessions.pop(session.id, None)
        self.deleted_turns += session.completed

    def check_resume(self, session: Session, cached: int, when: str) -> None:
        """A turn on `session` completed having read back `cached` prompt tokens."""
        required = session.required_cached(self.segment)
        self.resume_checks += session.last is not None
        if cached < required:
            self.violations.append(Violation(session.id, "resume", when, session.completed, required, cached,
                                             f"prompt of the last completed turn: {session.last.prompt_tokens}",
                                             list(session.events)))

    def check_card(self, session: Session, tokens: int | None, when: str) -> None:
        """The store shows `tokens` for `session` (None: no such session)."""
        required = session.required_tokens(self.segment)
        self.card_checks += 1
        if required and (tokens is None or tokens < required):
            self.violations.append(Violation(session.id, "card", when, session.completed, required, tokens,
                                             "clean" if session.clean else "touched since", list(session.events)))

    def turns_lost(self, check: str | None = None) -> int:
        """Completed turns found missing (by `check`: "card", not in the store; "resume", not read
        back): the (session, turn) pairs of the violations, each the session's last completed turn."""
        return len({(v.session, v.turn) for v in self.violations if check in (None, v.check)})

    def summary(self) -> dict:
        sessions = self.sessions.values()
        return {"sessions": self.created, "live_at_end": len(self.sessions),
                "turns_completed": self.deleted_turns + sum(s.completed for s in sessions),
                "live_with_a_completed_turn": sum(s.last is not None for s in sessions),
                "card_checks": self.card_checks, "resume_checks": self.resume_checks,
                "skipped_checks": self.skipped_checks, "card_errors": self.card_errors[:10],
                "turns_lost": self.turns_lost(), "turns_not_stored": self.turns_lost("card"),
                "turns_not_resumed": self.turns_lost("resume"),
                "violations": [v.__dict__ for check in ("card", "resume")
                               for v in [v for v in self.violations if v.check == check][:10]]}
