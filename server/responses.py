"""`POST /v1/responses`, backed by sessions.

A stored response keeps its conversation (messages, as JSON) and its model state (a session named
by the response id). `previous_response_id` continues from that state: the new response renders
the whole conversation but reads only what the previous one had not, and is saved as a new branch,
so the previous response stays reusable. `store: false` saves nothing.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections import OrderedDict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from engine.params import SamplingParams
from engine.store.backend import MemoryBackend, StoreBackend

from . import errors
from .auth import tenant_of
from .protocol import ResponsesRequest
from .requests import SampleResult, abort_on_disconnect, check_model, gather_unless_disconnected, start
from .structured import from_text_format
from .tenants import Tenant

RESPONSE_ID = re.compile(r"^resp_[0-9a-f]{24}$")


class ResponseStore:
    """Stored responses' conversations, as JSON in the session store's backend (kind "response"),
    so that any replica sharing the store can continue from them; a small LRU in front."""

    CACHED = 1024

    def __init__(self, backend: StoreBackend):
        self.backend = backend
        self.records: OrderedDict[str, dict] = OrderedDict()

    def get(self, tenant: Tenant, response_id: str) -> dict | None:
        """The tenant's stored response `response_id`; None if there is none (or it is another's)."""
        if not RESPONSE_ID.match(response_id):
            return None
        key = tenant.store_id(response_id)
        record = self.records.get(key)
        if record is None:
            data = self.backend.get("response", key)
            if data is None:
                return None
            record = json.loads(data)
        self._remember(key, record)
        return record

    def put(self, tenant: Tenant, response_id: str, record: dict) -> None:
        """Durable on return, like a session turn."""
        key = tenant.store_id(response_id)
        self.backend.put("response", key, json.dumps(record).encode())
        self.backend.barrier()
        self._remember(key, record)

    def _remember(self, key: str, record: dict) -> None:
        self.records[key] = record
        self.records.move_to_end(key)
        while len(self.records) > self.CACHED:
            self.records.popitem(last=False)


def responses_router(state) -> APIRouter:

    router = APIRouter()
    sessions = state.engine.engine.sessions
    store = ResponseStore(sessions.backend if sessions is not None else MemoryBackend())
    sessions_enabled = sessions is not None

    @router.post("/v1/responses")
    async def create(body: ResponsesRequest, request: Request):
        check_model(state, body.model)
        tenant = tenant_of(request)
        history: list[dict] = []
        if body.previous_response_id:
            previous = await asyncio.to_thread(store.get, tenant, body.previous_response_id)
            if previous is None:
                raise errors.APIError(404, f"no stored response {body.previous_response_id!r}",
                                      param="previous_response_id", code="previous_response_not_found")
            history = previous["messages"]
        new_items = ([{"role": "user", "content": body.input}] if isinstance(body.input, str)
                     else [{"role": m.role, "content": m.text()} for m in body.input])
        conversation = history + new_items
        system = [{"role": "system", "content": body.instructions}] if body.instructions else []
        tokenizer = state.engine.engine.tokenizer
        prompt_ids = tokenizer.encode(tokenizer.render_chat(system + conversation, add_generation_prompt=True))
        params = SamplingParams(max_tokens=body.max_output_tokens or state.default_max_tokens(len(prompt_ids)),
                                temperature=body.temperature, top_p=body.top_p,
                                stop_token_ids=tuple(tokenizer.eos_ids), constraint=from_text_format(body.text))
        rid = f"resp_{secrets.token_hex(12)}"
        saving = body.store and sessions_enabled
        resume_from = body.previous_response_id if saving and body.previous_response_id else None
        stream = await start(state, tenant, prompt_ids, params, 1, rid if saving else None, rid, resume_from)
        created = int(time.time())

        async def finish(text: str, result) -> dict:
            response = response_object(rid, created, state.model_name, body, text, result, len(prompt_ids))
            if body.store:
                record = {"messages": conversation + [{"role": "assistant", "content": text}], "response": response}
                await asyncio.to_thread(store.put, tenant, rid, record)
            return response

        if body.stream:
            events = stream_events(state, stream, rid, created, body, finish)
            return StreamingResponse(abort_on_disconnect(state, rid, events), media_type="text/event-stream")
        results = await gather_unless_disconnected(request, state, rid, stream)
        return JSONResponse(await finish(results[0].text, results[0]))

    @router.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str, request: Request):
        record = await asyncio.to_thread(store.get, tenant_of(request), response_id)
        if record is None:
            raise errors.APIError(404, f"no stored response {response_id!r}", code="response_not_found")
        return record["response"]

    return router


def response_object(rid, created, model, body: ResponsesRequest, text, result, num_prompt) -> dict:
    complete = result.finish_reason != "length"
    return {
        "id": rid, "object": "response", "created_at": created, "model": model,
        "status": "completed" if complete else "incomplete",
        "incomplete_details": None if complete else {"reason": "max_output_tokens"},
        "error": None, "instructions": body.instructions, "previous_response_id": body.previous_response_id,
        "store": body.store, "temperature": body.temperature, "top_p": body.top_p,
        "max_output_tokens": body.max_output_tokens, "parallel_tool_calls": False, "tool_choice": "none",
        "tools": [], "text": {"format": (body.text or {}).get("format") or {"type": "text"}}, "user": body.user,
        "metadata": {},
        "output": [{"type": "message", "id": f"msg_{rid[5:]}", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "usage": {"input_tokens": num_prompt, "output_tokens": result.num_tokens,
                  "total_tokens": num_prompt + result.num_tokens,
                  "input_tokens_details": {"cached_tokens": result.num_reused},
                  "output_tokens_details": {"reasoning_tokens": 0}},
    }


async def stream_events(state, stream, rid, created, body, finish):
    """The Responses API's typed SSE events, ending with `response.completed`."""
    seq = 0

    def event(kind: str, **fields) -> str:
        nonlocal seq
        seq += 1
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq, **fields})}\n\n"

    msg_id = f"msg_{rid[5:]}"
    shell = {"id": rid, "object": "response", "created_at": created, "model": state.model_name,
             "status": "in_progress", "output": []}
    yield event("response.created", response=shell)
    yield event("response.in_progress", response=shell)
    item = {"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []}
    yield event("response.output_item.added", output_index=0, item=item)
    yield event("response.content_part.added", item_id=msg_id, output_index=0, content_index=0,
                part={"type": "output_text", "text": "", "annotations": []})
    result = SampleResult()
    async for out in stream:
        result.add(out)
        if out.new_text:
            yield event("response.output_text.delta", item_id=msg_id, output_index=0, content_index=0,
                        delta=out.new_text)
    text = result.text
    part = {"type": "output_text", "text": text, "annotations": []}
    yield event("response.output_text.done", item_id=msg_id, output_index=0, content_index=0, text=text)
    yield event("response.content_part.done", item_id=msg_id, output_index=0, content_index=0, part=part)
    yield event("response.output_item.done", output_index=0,
                item={**item, "status": "completed", "content": [part]})
    response = await finish(text, result)
    yield event("response.completed" if response["status"] == "completed" else "response.incomplete",
                response=response)
