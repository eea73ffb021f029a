"""The OpenAI-compatible HTTP layer: thin handlers over the AsyncEngine.

Each handler validates (pydantic, then limits), renders the prompt, starts the request (so that
engine errors become HTTP errors before any byte is streamed), then returns JSON or an SSE stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine.async_engine import AsyncEngine, EngineStopped
from engine.llm_engine import ConstraintError, ContextTooLong, EngineError, QueueFull, RequestOutput
from engine.params import Constraint, SamplingError, SamplingParams
from engine.session_index import SESSION_ID, SessionError, check_session_id

from . import errors, openapi
from .auth import TenantGate, tenant_of
from .config import ServerConfig
from .limits import BodyLimit
from .logs import RequestIdMiddleware
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from .responses import responses_router
from .streaming import chat_chunk, completion_chunk, sse, usage_body
from .structured import constraint_of, logit_bias_of
from .tenants import Tenant, TenantDirectory
from .tools import StreamingToolParser, parse_calls, plan_tools

VERSION = "0.1.0"
SESSION_STATUS = {"busy": 409, "not_found": 404, "wrong_model": 409, "invalid_id": 400, "unavailable": 503}


@dataclass
class ServerState:
    engine: AsyncEngine
    config: ServerConfig
    metrics: Metrics
    model_name: str
    created: int

    def default_max_tokens(self, prompt_len: int) -> int:
        """What is left of `max_model_len` after the prompt (as vLLM), capped by
        --default-max-tokens when set; at least 1, so that a prompt too long by itself gets the
        engine's clear 400."""
        left = self.engine.engine.max_model_len - prompt_len
        cap = self.config.default_max_tokens
        return max(1, min(left, cap) if cap else left)


def build_app(engine: AsyncEngine, config: ServerConfig, model_name: str,
              tenants: TenantDirectory | None = None) -> FastAPI:
    state = ServerState(engine, config, Metrics(engine), model_name, int(time.time()))
    engine.on_output = state.metrics.observe

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await engine.shutdown(grace_s=config.shutdown_grace_s)  # SIGTERM: finish or save in-flight work

    app = FastAPI(title="mcserve", version=VERSION, lifespan=lifespan)
    app.state.mc = state
    errors.install(app)

    tenants = tenants or TenantDirectory.from_config(config.api_key, config.api_keys_file)
    openapi.install(app, api_key=not tenants.open, vocab_size=engine.engine.model.config.vocab_size)
    # The last added runs first: a caller is authenticated before its body is read.
    app.add_middleware(BodyLimit, max_bytes=config.max_request_body_bytes)
    app.add_middleware(TenantGate, tenants=tenants, max_concurrent=config.max_concurrent_per_tenant)
    app.add_middleware(RequestIdMiddleware)  # outermost: every line of a request, refusals too, has its id

    @app.get("/health")
    async def health():
        return health_body(engine)

    @app.get("/version")
    async def version():
        return {"version": VERSION, "model": model_name, "fingerprint": engine.engine.model.fingerprint}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(state)]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        check_model(state, model_id)
        return model_card(state)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(state, body.model)
        tokenizer = engine.engine.tokenizer
        tools = plan_tools(body, tokenizer.renders_tools)
        messages = [m.for_template() for m in body.messages]
        prompt_ids = tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=True, tools=tools.tools))
        params = sampling_params(state, body, body.max_completion_tokens or body.max_tokens,
                                 body.top_logprobs if body.logprobs else None, len(prompt_ids), tools.constraint)
        session_id = session_of(body, request)
        rid = f"chatcmpl-{secrets.token_hex(12)}"
        stream = await start(state, tenant_of(request), prompt_ids, params, body.n, session_id, rid)
        if body.stream:
            events = chat_events(state, stream, rid, body, len(prompt_ids), tools.parse)
            return StreamingResponse(abort_on_disconnect(state, rid, events),
                                     media_type="text/event-stream", headers=session_header(session_id))
        outputs = await gather_unless_disconnected(request, state, rid, stream)
        choices = [{"index": i, **chat_message(o, tools.parse),
                    "logprobs": chat_logprobs(tokenizer, o.samples) if body.logprobs else None}
                   for i, o in sorted(outputs.items())]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()),
                             "model": state.model_name, "choices": choices,
                             "usage": usage_body(len(prompt_ids), outputs)}, headers=session_header(session_id))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(state, body.model)
        tokenizer = engine.engine.tokenizer
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise errors.APIError(400, "this server takes one prompt per request", param="prompt")
            prompt = prompt[0]
        prompt_ids = list(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt)
        params = sampling_params(state, body, body.max_tokens, body.logprobs, len(prompt_ids))
        session_id = session_of(body, request)
        rid = f"cmpl-{secrets.token_hex(12)}"
        stream = await start(state, tenant_of(request), prompt_ids, params, body.n, session_id, rid)
        echo = tokenizer.decode(prompt_ids) if body.echo else ""
        if body.stream:
            events = completion_events(state, stream, rid, body, len(prompt_ids), echo)
            return StreamingResponse(abort_on_disconnect(state, rid, events),
                                     media_type="text/event-stream", headers=session_header(session_id))
        outputs = await gather_unless_disconnected(request, state, rid, stream)
        choices = [{"index": i, "text": echo + o.text, "finish_reason": o.finish_reason,
                    "logprobs": completion_logprobs(tokenizer, o.samples) if body.logprobs is not None else None}
                   for i, o in sorted(outputs.items())]
        return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()),
                             "model": state.model_name, "choices": choices,
                             "usage": usage_body(len(prompt_ids), outputs)}, headers=session_header(session_id))

    @app.get("/v1/sessions")
    async def list_sessions(request: Request):
        store, tenant = sessions_of(state), tenant_of(request)
        entries = await asyncio.to_thread(guarded, tenant, store.list)  # the store is thread-safe: no engine lock
        return {"object": "list", "data": [session_card(e, public) for e in entries
                                           if (public := tenant.public_id(e.session_id)) is not None]}

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str, request: Request):
        store, tenant = sessions_of(state), tenant_of(request)
        entry = await asyncio.to_thread(guarded, tenant, store.info, store_session_id(tenant, session_id))
        if entry is None:
            raise no_session(session_id)
        return session_card(entry, session_id)

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, request: Request):
        sessions_of(state)
        tenant = tenant_of(request)
        deleted = await engine.call(guarded, tenant, engine.engine.delete_session, store_session_id(tenant, session_id))
        if not deleted:
            raise no_session(session_id)
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    app.include_router(responses_router(state))
    return app


# --- helpers -------------------------------------------------------------------------------
def health_body(engine: AsyncEngine):
    """503 when the engine failed or is draining (a readiness probe takes the replica out);
    "degraded" (200: generation still works) while session writes fail; the store's damage
    counts either way. Reads snapshots only."""
    if engine.step_error is not None:
        return errors.error_response(503, f"engine failed: {engine.step_error}", code="engine_failed")
    if engine.draining:
        return errors.error_response(503, "the server is shutting down: in-flight requests are finishing",
                                     code="shutting_down")
    store = engine.engine.sessions
    if store is None:
        return {"status": "ok"}
    snap = store.snapshot()
    body = {"status": "ok", "session_store": {
        "backend": snap.backend, "write_errors": snap.write_errors, "failing_writes": snap.failing_writes,
        "unavailable_errors": snap.unavailable_errors, "integrity_errors": dict(snap.integrity_errors)}}
    if snap.failing_writes:  # the last writes did not land: new turns are not being saved
        body["status"] = "degraded"
        body["session_store"]["recent_write_errors"] = list(snap.recent_write_errors)[-3:]
    if snap.unavailable is not None:  # session requests get 503 until the store answers again
        body["status"] = "degraded"
        body["session_store"]["unavailable"] = snap.unavailable
    return body


def model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "mcserve",
            "max_model_len": state.engine.engine.max_model_len}


def check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise errors.APIError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                              param="model", code="model_not_found")


def session_of(body: SamplingFields, request: Request) -> str | None:
    """The session a request names (the field, or the X-Session-Id header), as the client knows it."""
    session_id = body.session_id or request.headers.get("x-session-id")
    if session_id is not None:
        check_public_session_id(session_id)
    return session_id


def check_public_session_id(session_id: str) -> None:
    try:
        check_session_id(session_id, SESSION_ID)
    except SessionError as e:
        raise errors.APIError(400, str(e), param="session_id", code="invalid_session_id") from None


def store_session_id(tenant: Tenant, session_id: str) -> str:
    check_public_session_id(session_id)
    return tenant.store_id(session_id)


def no_session(session_id: str) -> errors.APIError:
    return errors.APIError(404, f"no session {session_id!r}", param="session_id", code="session_not_found")


def session_header(session_id: str | None) -> dict[str, str]:
    return {"X-Session-Id": session_id} if session_id else {}


def sessions_of(state: ServerState):
    store = state.engine.engine.sessions
    if store is None:
        raise errors.APIError(404, "sessions are not enabled on this server", code="sessions_disabled")
    return store


def session_api_error(e: SessionError, tenant: Tenant) -> errors.APIError:
    """The one mapping of session errors to HTTP; the message names sessions as the client does."""
    message = str(e)
    if tenant.name:
        message = message.replace(tenant.store_id(""), "")
    retry = {"Retry-After": "5"} if e.code == "unavailable" else None  # the store may be back soon
    return errors.APIError(SESSION_STATUS.get(e.code, 400), message, param="session_id", code=f"session_{e.code}",
                           headers=retry)


def guarded(tenant: Tenant, fn, *args):
    try:
        return fn(*args)
    except SessionError as e:
        raise session_api_error(e, tenant) from None


def session_card(entry, public_id: str) -> dict:
    return {"id": public_id, "object": "session", "tokens": entry.num_tokens,
            "checkpoints": entry.num_checkpoints, "bytes": entry.nbytes, "tier": entry.tier,
            "created": int(entry.created), "last_used": int(entry.last_used)}


def sampling_params(state: ServerState, body: SamplingFields, max_tokens: int | None,
                    logprobs: int | None, prompt_len: int, tool_constraint: Constraint | None = None) -> SamplingParams:
    tokenizer = state.engine.engine.tokenizer
    constraint = constraint_of(body)
    if tool_constraint is not None and constraint is not None:
        raise errors.APIError(400, "a required or named tool_choice cannot be combined with response_format",
                              param="tool_choice", code="invalid_value")
    try:
        return SamplingParams(
            max_tokens=max_tokens or state.default_max_tokens(prompt_len), temperature=body.temperature,
            top_p=body.top_p, top_k=body.top_k, min_p=body.min_p, seed=body.seed,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, stop=body.stop_strings(),
            stop_token_ids=tuple(tokenizer.eos_ids), logprobs=logprobs, ignore_eos=body.ignore_eos,
            logit_bias=logit_bias_of(body.logit_bias), constraint=tool_constraint or constraint)
    except SamplingError as e:
        raise errors.APIError(400, str(e), code="invalid_value") from None


async def start(state: ServerState, tenant: Tenant, prompt_ids: list[int], params: SamplingParams, n: int,
                session_id: str | None, request_id: str, resume_from: str | None = None
                ) -> AsyncIterator[RequestOutput]:
    """Submit the request and wait for its first output, so that refusals are HTTP errors.
    `session_id` and `resume_from` are as the tenant names them."""
    config = state.config
    if not prompt_ids:
        raise errors.APIError(400, "the prompt is empty", param="prompt", code="empty_prompt")
    if len(prompt_ids) > config.max_prompt_tokens:
        raise errors.APIError(400, f"the prompt has {len(prompt_ids)} tokens, more than this server's limit "
                                   f"of {config.max_prompt_tokens}", param="messages", code="prompt_too_long")
    if session_id is not None and n > 1:
        raise errors.APIError(400, "n > 1 cannot be combined with a session", param="n")
    if state.engine.num_in_flight() >= config.engine.max_waiting:
        raise errors.APIError(429, "the server is busy; retry shortly", code="queue_full",
                              headers={"Retry-After": "1"})
    state.metrics.prompt_tokens.inc(len(prompt_ids))
    stream = state.engine.generate(
        prompt_ids, params, n=n, request_id=request_id,
        session_id=tenant.store_id(session_id) if session_id is not None else None,
        resume_from=tenant.store_id(resume_from) if resume_from is not None else None,
        cache_salt=tenant.name)  # a tenant's prompts are not found in the prefix cache by another
    try:
        first = await stream.__anext__()
    except SessionError as e:
        raise session_api_error(e, tenant) from None
    except EngineStopped as e:
        raise errors.APIError(503, str(e), code="shutting_down") from None
    except QueueFull as e:
        raise errors.APIError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from None
    except ContextTooLong as e:
        raise errors.APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
    except ConstraintError as e:
        param = "logit_bias" if "logit_bias" in str(e) else "response_format"
        raise errors.APIError(400, str(e), param=param, code="invalid_value") from None
    except EngineError as e:
        raise errors.APIError(400, str(e), param="prompt") from None
    return _prepend(first, stream)


async def _prepend(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()  # a client that went away aborts the request


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        continue


BACKGROUND: set[asyncio.Task] = set()  # tasks must be referenced until done, or they may be collected


def schedule_abort(state: ServerState, rid: str) -> None:
    """Abort a request in a task of its own: the caller may be a cancelled scope (a response
    whose client went away), where an await would be cancelled too."""
    job = asyncio.get_running_loop().create_task(state.engine.abort(rid))
    BACKGROUND.add(job)
    job.add_done_callback(BACKGROUND.discard)


async def abort_on_disconnect(state: ServerState, rid: str, events: AsyncIterator[str]):
    """Stream `events`; if the stream stops early (Starlette cancels it when the client goes away),
    abort the request, freeing its slot and blocks (a session keeps what was read)."""
    finished = False
    try:
        async for event in events:
            yield event
        finished = True
    finally:
        if not finished:
            schedule_abort(state, rid)


async def gather_unless_disconnected(request: Request, state: ServerState, rid: str,
                                     stream: AsyncIterator[RequestOutput]) -> dict[int, "SampleResult"]:
    # A plain JSON response does not watch its connection, so watch it here.
    watcher = asyncio.create_task(wait_for_disconnect(request))
    watcher.add_done_callback(lambda t: t.cancelled() or schedule_abort(state, rid))
    try:
        return await gather(state, stream)
    finally:
        watcher.cancel()


@dataclass
class SampleResult:
    text: str = ""
    finish_reason: str | None = None
    num_tokens: int = 0
    num_reused: int = 0
    samples: list = field(default_factory=list)

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.samples += out.logprobs
        self.num_tokens, self.num_reused = out.num_output_tokens, out.num_reused_tokens
        if out.finished:
            self.finish_reason = out.finish_reason


async def gather(state: ServerState, stream: AsyncIterator[RequestOutput]) -> dict[int, SampleResult]:
    results: dict[int, SampleResult] = {}
    async for out in stream:
        results.setdefault(out.index, SampleResult()).add(out)
    return results


def chat_message(result: "SampleResult", parse_tools: bool) -> dict:
    """A finished choice's message and finish_reason, its tool calls parsed out when asked."""
    content, calls = parse_calls(result.text) if parse_tools else (result.text, [])
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    reason = "tool_calls" if calls and result.finish_reason == "stop" else result.finish_reason
    return {"message": message, "finish_reason": reason}


async def chat_events(state, stream, rid, body, num_prompt, parse_tools: bool = False):
    created = int(time.time())
    results: dict[int, SampleResult] = {}
    parsers: dict[int, StreamingToolParser] = {}
    chunk = functools.partial(chat_chunk, rid, created, state.model_name)
    for i in range(body.n):
        yield sse(chunk(i, {"role": "assistant", "content": ""}))
    async for out in stream:
        results.setdefault(out.index, SampleResult()).add(out)
        logprobs = chat_logprobs(state.engine.engine.tokenizer, out.logprobs) if body.logprobs else None
        text, calls = out.new_text, []
        if parse_tools:
            parser = parsers.setdefault(out.index, StreamingToolParser())
            text, calls = parser.feed(out.new_text)
            if out.finished:
                text += parser.finish()
        if text or logprobs:
            yield sse(chunk(out.index, {"content": text}, logprobs=logprobs))
        if calls:
            yield sse(chunk(out.index, {"tool_calls": calls}))
        if out.finished:
            called = out.index in parsers and parsers[out.index].calls
            reason = "tool_calls" if called and out.finish_reason == "stop" else out.finish_reason
            yield sse(chunk(out.index, {}, finish_reason=reason))
    if body.stream_options and body.stream_options.include_usage:
        yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                   "choices": [], "usage": usage_body(num_prompt, results)})
    yield "data: [DONE]\n\n"


async def completion_events(state, stream, rid, body, num_prompt, echo):
    created = int(time.time())
    results: dict[int, SampleResult] = {}
    if echo:
        for i in range(body.n):
            yield sse(completion_chunk(rid, created, state.model_name, i, echo))
    async for out in stream:
        results.setdefault(out.index, SampleResult()).add(out)
        logprobs = (completion_logprobs(state.engine.engine.tokenizer, out.logprobs)
                    if body.logprobs is not None else None)
        if out.new_text or out.finished:
            yield sse(completion_chunk(rid, created, state.model_name, out.index, out.new_text,
                                       finish_reason=out.finish_reason if out.finished else None, logprobs=logprobs))
    if body.stream_options and body.stream_options.include_usage:
        yield sse({"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                   "choices": [], "usage": usage_body(num_prompt, results)})
    yield "data: [DONE]\n\n"


def chat_logprobs(tokenizer, samples) -> dict:
    def entry(token_id, logprob):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {"content": [{**entry(s.token, s.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in s.top_logprobs]} for s in samples]}


def completion_logprobs(tokenizer, samples) -> dict:
    tokens = [tokenizer.decode([s.token], skip_special_tokens=False) for s in samples]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [s.logprob for s in samples],
            "top_logprobs": [{tokenizer.decode([t], skip_special_tokens=False): lp for t, lp in s.top_logprobs}
                             for s in samples], "text_offset": offsets}
