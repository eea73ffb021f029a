"""The OpenAI-compatible HTTP layer: thin handlers over the AsyncEngine.

Each handler validates (pydantic, then limits), renders the prompt, starts the request (so that
engine errors become HTTP errors before any byte is streamed), then returns JSON or an SSE stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine.async_engine import AsyncEngine

from . import errors, openapi
from .auth import TenantGate, tenant_of
from .config import ServerConfig
from .limits import BodyLimit
from .logs import RequestIdMiddleware
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest
from .requests import (
    ServerState,
    abort_on_disconnect,
    chat_prompt,
    check_model,
    gather_unless_disconnected,
    sampling_params,
    start,
)
from .responses import responses_router
from .sessions import guarded, no_session, session_card, session_header, session_of, sessions_of, store_session_id
from .streaming import chat_events, chat_logprobs, chat_message, completion_events, completion_logprobs, usage_body
from .tenants import TenantDirectory
from .tokenize import tokenize_router

VERSION = "0.1.0"


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
        prompt = chat_prompt(tokenizer, body)
        prompt_ids, tools = prompt.ids, prompt.tools
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
    app.include_router(tokenize_router(state))
    return app


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

