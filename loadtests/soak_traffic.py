"""The soak's clients: conversations over /v1/chat/completions and /v1/completions, streamed or
not, with sessions, and requests that the client gives up on (a stream dropped after a few chunks,
a plain request cancelled before its answer).

Each worker runs one conversation at a time, under the session's lock (which the store checks
take too), so that the ledger knows every request that touched a session.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import httpx

from .bench_serve import synthetic_text
from .soak_checks import check_card
from .soak_ledger import Ledger, Session, Turn


@dataclass
class Mix:
    """The share of each kind of request; the rest complete normally."""
    stream: float = 0.5
    disconnect: float = 0.08   # of streamed requests: drop the connection after a few chunks
    abort: float = 0.08        # cancel the request (streamed or not) after a short while
    sessionless: float = 0.05
    chat: float = 0.5          # of conversations: chat; the rest are completions
    header: float = 0.5        # of conversations: name the session in X-Session-Id
    turns: tuple[int, int] = (2, 8)
    words: tuple[int, int] = (3, 30)
    max_tokens: tuple[int, int] = (1, 12)
    max_conversation_tokens: int = 1500  # a conversation ends once its prompt is this long
    keep_sessions: int = 64    # ended conversations kept for the final checks; older ones are deleted


@dataclass
class Plan:
    stream: bool
    action: str          # "complete", "disconnect" (after `chunks` chunks), "abort" (after `after_s`)
    max_tokens: int
    temperature: float
    chunks: int = 1
    after_s: float = 0.0


@dataclass
class Outcome:
    kind: str            # completed, disconnected, aborted, deleted, http, transport, incomplete, malformed
    started: float
    ended: float
    status: int | None = None
    text: str = ""
    usage: dict | None = None
    error: str = ""


@dataclass
class Tally:
    """What every request came to."""
    outcomes: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)   # HTTP errors by status
    server_errors: list[dict] = field(default_factory=list)   # 5xx: status, body
    client_errors: list[dict] = field(default_factory=list)   # 4xx other than a busy session
    cut: list[Outcome] = field(default_factory=list)          # transport errors, incomplete streams
    malformed: list[dict] = field(default_factory=list)       # a 200 that is not a valid response

    def record(self, outcome: Outcome, endpoint: str) -> None:
        self.outcomes[outcome.kind] += 1
        if outcome.kind == "http":
            self.statuses[outcome.status] += 1
            entry = {"status": outcome.status, "endpoint": endpoint, "body": outcome.error[:300]}
            if outcome.status >= 500:
                self.server_errors.append(entry)
            elif not busy(outcome):
                self.client_errors.append(entry)
        elif outcome.kind in ("transport", "incomplete"):
            self.cut.append(outcome)
        elif outcome.kind == "malformed":
            self.malformed.append({"endpoint": endpoint, "error": outcome.error[:300]})

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())


def busy(outcome: Outcome) -> bool:
    """409 session_busy: the request before it, which the client dropped, is still being aborted."""
    return outcome.status == 409 and "session_busy" in outcome.error


def request_for(session: Session, model: str, user: str, plan: Plan) -> tuple[str, dict, dict, object]:
    """The endpoint, body and headers of a turn, and the conversation it extends (before the reply)."""
    body = {"model": model, "max_tokens": plan.max_tokens, "temperature": plan.temperature, "stream": plan.stream}
    if plan.stream:
        body["stream_options"] = {"include_usage": True}
    if session.kind == "chat":
        path, sent = "/v1/chat/completions", [*session.history, {"role": "user", "content": user}]
        body["messages"] = sent
    else:
        path, sent = "/v1/completions", f"{session.history}\n\nUser: {user}\nAssistant:"
        body["prompt"] = sent
    headers = {}
    if session.id is not None and session.via_header:
        headers["X-Session-Id"] = session.id
    elif session.id is not None:
        body["session_id"] = session.id
    return path, body, headers, sent


async def send(client: httpx.AsyncClient, path: str, body: dict, headers: dict, plan: Plan) -> Outcome:
    started = time.monotonic()
    try:
        if plan.action == "abort":
            return await asyncio.wait_for(exchange(client, path, body, headers, plan, started), plan.after_s)
        return await exchange(client, path, body, headers, plan, started)
    except TimeoutError:  # asyncio's: we cancelled it (httpx's own timeouts are TransportErrors)
        return Outcome("aborted", started, time.monotonic())
    except httpx.TransportError as e:
        return Outcome("transport", started, time.monotonic(), error=f"{type(e).__name__}: {e}")
    except (ValueError, KeyError, TypeError, IndexError) as e:  # a 200 whose body is not what the API says
        return Outcome("malformed", started, time.monotonic(), 200, error=f"{type(e).__name__}: {e}")


async def exchange(client, path, body, headers, plan, started) -> Outcome:
    chat = path.endswith("chat/completions")
    if not plan.stream:
        response = await client.post(path, json=body, headers=headers)
        if response.status_code != 200:
            return Outcome("http", started, time.monotonic(), response.status_code, error=response.text)
        out = response.json()
        choice = out["choices"][0]
        return Outcome("completed", started, time.monotonic(), 200,
                       choice["message"]["content"] if chat else choice["text"], out["usage"])
    async with client.stream("POST", path, json=body, headers=headers) as response:
        if response.status_code != 200:
            error = (await response.aread()).decode(errors="replace")
            return Outcome("http", started, time.monotonic(), response.status_code, error=error)
        return await read_events(response, chat, plan, started)


async def read_events(response: httpx.Response, chat: bool, plan: Plan, started: float) -> Outcome:
    text, usage, chunks = [], None, 0
    async for line in response.aiter_lines():
        if line == "data: [DONE]":
            if usage is None:
                return Outcome("malformed", started, time.monotonic(), 200, error="[DONE] without a usage chunk")
            return Outcome("completed", started, time.monotonic(), 200, "".join(text), usage)
        if not line.startswith("data: "):
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            text.append((choice["delta"].get("content") if chat else choice["text"]) or "")
        chunks += 1
        if plan.action == "disconnect" and chunks >= plan.chunks:
            return Outcome("disconnected", started, time.monotonic())  # leaving the block drops the connection
    return Outcome("incomplete", started, time.monotonic(), 200, error="the stream ended before [DONE]")


def event(outcome: Outcome, plan: Plan, lifetime: int) -> dict:
    usage = outcome.usage or {}
    return {"at": round(outcome.started, 2), "lifetime": lifetime, "stream": plan.stream, "action": plan.action,
            "outcome": outcome.kind, "status": outcome.status, "prompt": usage.get("prompt_tokens"),
            "completion": usage.get("completion_tokens"),
            "cached": usage.get("prompt_tokens_details", {}).get("cached_tokens"),
            "seconds": round(outcome.ended - outcome.started, 3)}


class Traffic:
    def __init__(self, client: httpx.AsyncClient, model: str, ledger: Ledger, mix: Mix, seed: int,
                 max_requests: int):
        self.client, self.model, self.ledger, self.mix = client, model, ledger, mix
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.max_requests = max_requests
        self.stopping = asyncio.Event()
        self.lifetime = 0  # which server lifetime the traffic is in (for the violations' `when`)
        self.retired: deque[Session] = deque()
        self._ids = iter(range(1 << 62))
        self._tag = f"soak-{seed}-{int(time.time())}"

    def new_session(self, named: bool = True) -> Session:
        rng, mix = self.rng, self.mix
        kind = "chat" if rng.random() < mix.chat else "completion"
        session = Session(f"{self._tag}-{next(self._ids)}" if named else None, kind, rng.random() < mix.header,
                          rng.randint(*mix.turns), [] if kind == "chat" else "")
        if named:
            self.ledger.add(session)
        return session

    def plan(self, final: bool = False) -> Plan:
        rng, mix = self.rng, self.mix
        plan = Plan(rng.random() < mix.stream, "complete", 1 if final else rng.randint(*mix.max_tokens),
                    rng.choice((0.0, 0.8, 1.0)))
        roll = rng.random()
        if final:
            return plan
        if plan.stream and roll < mix.disconnect:
            plan.action, plan.chunks = "disconnect", rng.randint(1, 3)
        elif roll > 1 - mix.abort:
            plan.action, plan.after_s = "abort", rng.uniform(0.005, 0.3)
        return plan

    async def worker(self) -> None:
        session = self.new_session()
        while not self.stopping.is_set() and self.tally.requests < self.max_requests:
            if self.rng.random() < self.mix.sessionless:
                await self.turn(self.new_session(named=False), self.plan())
                continue
            if session.turns_left <= 0 or (session.last and
                                           session.last.prompt_tokens > self.mix.max_conversation_tokens):
                await self.retire(session)
                session = self.new_session()
            async with session.lock:
                await self.turn(session, self.plan())

    async def retire(self, session: Session) -> None:
        """Keep an ended conversation for the final checks; past `keep_sessions` of them, check
        the oldest's card and delete it. So the store, and the server's index of it, stay bounded
        as in steady use, and growth past warm-up is a leak rather than more data."""
        self.retired.append(session)
        while len(self.retired) > self.mix.keep_sessions:
            await self.delete(self.retired.popleft())

    async def delete(self, session: Session) -> None:
        async with session.lock:
            if not await check_card(self.client, self.ledger, session, f"before delete (lifetime {self.lifetime})"):
                return  # the server is down: the session stays for the final checks
            started, endpoint = time.monotonic(), "DELETE /v1/sessions/{id}"
            try:
                response = await self.client.delete(f"/v1/sessions/{session.id}")
            except httpx.TransportError as e:
                self.tally.record(Outcome("transport", started, time.monotonic(), error=f"{type(e).__name__}: {e}"),
                                  endpoint)
                self.ledger.forget(session)  # killed mid-delete: it may be gone or not, so nothing is owed
                return
            if response.status_code in (200, 404):  # 404: nothing of it was ever saved
                self.tally.record(Outcome("deleted", started, time.monotonic(), response.status_code), endpoint)
                self.ledger.forget(session)
            else:  # refused (busy: an abort of its last turn still running): it stays, and is checked
                self.tally.record(Outcome("http", started, time.monotonic(), response.status_code,
                                          error=response.text), endpoint)

    async def turn(self, session: Session, plan: Plan, when: str | None = None) -> Outcome:
        """One request on `session` (hold its lock); the ledger learns how it went."""
        user = synthetic_text(self.rng, self.rng.randint(*self.mix.words))
        path, body, headers, sent = request_for(session, self.model, user, plan)
        outcome = await send(self.client, path, body, headers, plan)
        self.tally.record(outcome, path)
        if session.id is not None:
            session.log(event(outcome, plan, self.lifetime))
        session.turns_left -= 1
        if outcome.kind == "completed":
            self.completed(session, outcome, sent, when or f"traffic (lifetime {self.lifetime})")
        elif session.id is not None:
            session.touched()
        if outcome.kind in ("transport", "http"):
            await asyncio.sleep(0.25)  # the server is down or the session still busy: not a hot loop
        return outcome

    def completed(self, session: Session, outcome: Outcome, sent, when: str) -> None:
        usage = outcome.usage
        if session.id is not None:
            self.ledger.check_resume(session, usage["prompt_tokens_details"]["cached_tokens"], when)
            session.completed_turn(Turn(usage["prompt_tokens"], usage["completion_tokens"],
                                        usage["prompt_tokens_details"]["cached_tokens"]))
        if session.kind == "chat":
            session.history = [*sent, {"role": "assistant", "content": outcome.text}]
        else:
            session.history = sent + outcome.text
