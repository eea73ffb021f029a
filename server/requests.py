"""The request layer: the one narrow seam between the HTTP handlers and the AsyncEngine.

A handler validates, renders its prompt and builds SamplingParams here, then `start`s the request
(so that engine refusals become HTTP errors before any byte is streamed) and reads its outputs,
aborting it when the client goes away.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from engine.async_engine import AsyncEngine, EngineStopped
from engine.llm_engine import ConstraintError, ContextTooLong, EngineError, QueueFull, RequestOutput
from engine.params import Constraint, SamplingError, SamplingParams
from engine.session_index import SessionError

from . import errors
from .config import ServerConfig
from .metrics import Metrics
from .protocol import ChatFields, SamplingFields
from .sessions import session_api_error
from .structured import constraint_of, logit_bias_of
from .tenants import Tenant
from .tools import ToolPlan, plan_tools


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


@dataclass
class ChatPrompt:
    ids: list[int]
    tools: ToolPlan


def chat_prompt(tokenizer, body: ChatFields, add_generation_prompt: bool = True,
                add_special_tokens: bool = False) -> ChatPrompt:
    """A chat body's messages and tools as the model reads them (chat completions, /tokenize)."""
    tools = plan_tools(body, tokenizer.renders_tools)
    text = tokenizer.render_chat([m.for_template() for m in body.messages], add_generation_prompt, tools.tools)
    return ChatPrompt(tokenizer.encode(text, add_special_tokens), tools)


def check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise errors.APIError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                              param="model", code="model_not_found")


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
        return await gather(stream)
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


async def gather(stream: AsyncIterator[RequestOutput]) -> dict[int, SampleResult]:
    results: dict[int, SampleResult] = {}
    async for out in stream:
        results.setdefault(out.index, SampleResult()).add(out)
    return results

