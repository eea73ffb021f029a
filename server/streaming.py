"""Response pieces shared by the JSON and SSE paths: chunks, usage, SSE framing."""

from __future__ import annotations

import json


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
