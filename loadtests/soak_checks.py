"""The store checks over HTTP: a session's card (GET /v1/sessions/{id}) before it is deleted,
every session's card after each restart and at the end, and at the end, after a last kill -9, a
follow-up turn on every session. The caller holds no session lock; these take it, so that no
turn on the session is in flight meanwhile."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import httpx

from .soak_ledger import Ledger, Session

if TYPE_CHECKING:
    from .soak_traffic import Traffic

CARD_PARALLELISM = 4  # cheap reads; few, so that the traffic keeps its connections

# The store's own counts of trouble (server/metrics.py), and of its work, read before each kill.
STORE_COUNTERS = ("session_store_integrity_errors", "session_write_errors", "session_store_collected",
                  "evictions", "preemptions")


async def check_card(client: httpx.AsyncClient, ledger: Ledger, session: Session, when: str) -> bool:
    """The store's card of `session` against the ledger (hold the session's lock); False if the
    server could not answer (killed meanwhile: a later round checks it)."""
    try:
        response = await client.get(f"/v1/sessions/{session.id}")
    except httpx.TransportError:
        ledger.skipped_checks += 1
        return False
    if response.status_code not in (200, 404):
        ledger.skipped_checks += 1
        ledger.card_errors.append({"session": session.id, "status": response.status_code,
                                   "body": response.text[:300]})
        return False
    tokens = response.json()["tokens"] if response.status_code == 200 else None
    session.log({"at": round(time.monotonic(), 2), "card": tokens, "when": when})
    ledger.check_card(session, tokens, when)
    return True


async def check_cards(client: httpx.AsyncClient, ledger: Ledger, when: str, deadline: float) -> tuple[int, int]:
    """Check the card of every session that must show tokens. Returns (due, checked)."""
    limit = asyncio.Semaphore(CARD_PARALLELISM)
    due = [s for s in list(ledger.sessions.values()) if s.required_tokens(ledger.segment)]

    async def one(session: Session) -> bool:
        async with limit, session.lock:
            if time.monotonic() > deadline or session.deleted:
                return session.deleted
            return await check_card(client, ledger, session, when)
    return len(due), sum(await asyncio.gather(*(one(s) for s in due)))


async def follow_up_all(traffic: Traffic, parallelism: int, deadline: float) -> tuple[int, int]:
    """One short turn on every session with a completed turn: it must read the saved state back
    (the ledger's resume check). Returns (due, done)."""
    limit = asyncio.Semaphore(parallelism)
    due = [s for s in traffic.ledger.sessions.values() if s.last is not None]

    async def one(session: Session) -> bool:
        async with limit, session.lock:
            for _ in range(3):  # a session still busy with an abort the client left behind: retry
                if time.monotonic() > deadline:
                    return False
                outcome = await traffic.turn(session, traffic.plan(final=True), when="final")
                if outcome.kind == "completed":
                    return True
            return False
    return len(due), sum(await asyncio.gather(*(one(s) for s in due)))


async def store_counters(client: httpx.AsyncClient) -> dict | None:
    """The server's store counters by label (/metrics); None if it could not answer."""
    from prometheus_client.parser import text_string_to_metric_families
    try:
        text = (await client.get("/metrics")).text
    except httpx.TransportError:
        return None
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        name = family.name.removeprefix("mcserve:")
        if name in STORE_COUNTERS:
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    label = ",".join(sample.labels.values())
                    counts[f"{name}{{{label}}}" if label else name] = sample.value
    return counts
