"""Response pieces shared by the JSON and SSE paths: chunks, messages, logprobs, usage, SSE
framing, and the event streams of chat and completions."""

from __future__ import annotations

import functools
import json
import time

from .requests import SampleResult
from .tools import StreamingToolParser, parse_calls


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict,
               finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str,
                     finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_body(num_prompt: int, results: dict) -> dict:
    """OpenAI usage; `cached_tokens` are the prompt tokens read back from saved state (a resumed
    session or a shared prefix) instead of being computed."""
    completion = sum(r.num_tokens for r in results.values())
    cached = results[min(results)].num_reused if results else 0
    return {"prompt_tokens": num_prompt, "completion_tokens": completion, "total_tokens": num_prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


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

