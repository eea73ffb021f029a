"""/openapi.json as the server really answers, which the fuzzer (tests/test_fuzz_api.py) holds it to.

FastAPI documents every 200 as any JSON and every validation failure as a 422. This server
answers a bad request with a 400 in OpenAI's error shape (errors.py), refuses with 401, 404,
409, 429 and 503 in that shape too, streams text/event-stream when asked, and serves /metrics
as Prometheus text. `install` rewrites the generated schema in one place, so the routes stay
as they are; a route missing from the tables below keeps what FastAPI says (and the fuzzer
reports what it does not declare).
"""

from __future__ import annotations

import functools
from typing import Literal

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from engine.session_index import SESSION_ID

from .auth import gated


# --- bodies (documentation only: the handlers build plain dicts) ----------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    session_write_errors: int | None = None  # degraded: serving works, persistence does not
    recent: list[str] | None = None


class Version(BaseModel):
    version: str
    model: str
    fingerprint: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


FinishReason = Literal["stop", "length", "abort"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # the last chunk, with stream_options.include_usage (no choices)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Session(BaseModel):
    id: str
    object: Literal["session"]
    tokens: int
    checkpoints: int
    bytes: int
    tier: Literal["memory", "store"]
    created: int
    last_used: int


class SessionList(BaseModel):
    object: Literal["list"]
    data: list[Session]


class SessionDeleted(BaseModel):
    id: str
    object: Literal["session.deleted"]
    deleted: Literal[True]


class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list


class OutputMessage(BaseModel):
    type: Literal["message"]
    id: str
    status: str
    role: Literal["assistant"]
    content: list[OutputText]


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens_details: dict[str, int]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"]
    created_at: int
    model: str
    status: Literal["completed", "incomplete"]
    incomplete_details: dict | None
    error: dict | None
    instructions: str | None
    previous_response_id: str | None
    store: bool
    temperature: float
    top_p: float
    max_output_tokens: int | None
    output: list[OutputMessage]
    usage: ResponseUsage


class ResponseEvent(BaseModel):
    """One of the Responses API's typed events; `type` is also the SSE event's name."""
    type: str
    sequence_number: int
    response: dict | None = None


class Tokenized(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class Detokenized(BaseModel):
    prompt: str


# --- what each operation answers ------------------------------------------------------------
GENERATION = (400, 404, 409, 413, 429, 503)  # 404: the model (or previous response); 409: a busy or
# another model's session; 413: the body is over its limit; 429: the queue is full; 503: shutting
# down, or the session store is out
SESSION_STORE = (400, 404, 409, 503)    # engine.session_index.SessionError codes (app.SESSION_STATUS)

OPERATIONS = {  # (method, path): (the 200's body, error statuses)
    ("get", "/health"): (Health, (503,)),
    ("get", "/version"): (Version, ()),
    ("get", "/v1/models"): (ModelList, ()),
    ("get", "/v1/models/{model_id}"): (ModelCard, (404,)),
    ("post", "/v1/chat/completions"): (ChatCompletion, GENERATION),
    ("post", "/v1/completions"): (Completion, GENERATION),
    ("get", "/v1/sessions"): (SessionList, SESSION_STORE),
    ("get", "/v1/sessions/{session_id}"): (Session, SESSION_STORE),
    ("delete", "/v1/sessions/{session_id}"): (SessionDeleted, SESSION_STORE),
    ("post", "/v1/responses"): (ResponseObject, GENERATION),
    ("get", "/v1/responses/{response_id}"): (ResponseObject, (404,)),
    ("post", "/tokenize"): (Tokenized, (400, 404, 413)),
    ("post", "/detokenize"): (Detokenized, (400, 404, 413)),
}
STREAMS = {  # "stream": true answers text/event-stream: (each event's data, ends with "data: [DONE]")
    ("post", "/v1/chat/completions"): (ChatCompletionChunk, True),
    ("post", "/v1/completions"): (CompletionChunk, True),
    ("post", "/v1/responses"): (ResponseEvent, False),
}
TEXT = {("get", "/metrics"): "text/plain"}  # Prometheus' exposition format
SESSION_HEADER = {("post", "/v1/chat/completions"), ("post", "/v1/completions")}
DESCRIPTIONS = {400: "Bad request (validation errors too: this server answers no 422)",
                401: "Missing or wrong API key", 404: "Not found", 409: "Conflict",
                413: "The request body is over --max-request-body-bytes", 429: "Too many requests",
                503: "Unavailable"}
BODIES = [ErrorResponse, *(body for body, _ in OPERATIONS.values()), *(event for event, _ in STREAMS.values())]


def install(app: FastAPI, api_key: bool, vocab_size: int) -> None:
    """Serve the declared schema from /openapi.json; with `api_key`, the gated paths also declare 401."""
    generate = app.openapi  # FastAPI's, from the routes (all of them by the first request)
    app.openapi = functools.cache(lambda: declare(generate(), api_key, vocab_size))


def declare(schema: dict, api_key: bool, vocab_size: int) -> dict:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    refine_requests(schema, vocab_size)
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    _, defs = models_json_schema([(m, "serialization") for m in BODIES], ref_template="#/components/schemas/{model}")
    components.update(defs["$defs"])
    if api_key:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            declare_operation(operation, (method, path), api_key and gated(path))
    return schema


def refine_requests(schema: dict, vocab_size: int) -> None:
    """What the handlers and the engine check beyond pydantic, so that a request the schema
    allows is one the server takes (the messages stay the server's own)."""
    session_id = {"type": "string", "pattern": SESSION_ID.pattern}
    for methods in schema["paths"].values():
        for operation in methods.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "session_id":
                    parameter["schema"].update(session_id)
    components = schema["components"]["schemas"]
    text = {"type": "string", "minLength": 1}
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        fields = components[name]["properties"]
        fields["session_id"]["anyOf"][0] = session_id
        fields["stop"]["anyOf"][:2] = [text, {"type": "array", "items": text, "maxItems": 4}]
    token = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
    tokens = {"type": "array", "items": token, "minItems": 1}
    one = {"minItems": 1, "maxItems": 1}  # one prompt a request
    components["CompletionRequest"]["properties"]["prompt"]["anyOf"] = [
        text, {"type": "array", "items": text, **one}, tokens, {"type": "array", "items": tokens, **one}]


def declare_operation(operation: dict, key: tuple[str, str], authenticated: bool) -> None:
    responses = operation["responses"]
    if responses.pop("422", None) is not None:  # a validation error is a 400 here
        responses["400"] = error(400)
    if key in TEXT:
        responses["200"]["content"] = {TEXT[key]: {"schema": {"type": "string"}}}
    if key in OPERATIONS:
        body, statuses = OPERATIONS[key]
        responses["200"]["content"] = {"application/json": {"schema": ref(body)}}
        responses.update({str(status): error(status) for status in statuses})
    if key in STREAMS:
        responses["200"]["content"]["text/event-stream"] = {"schema": event_stream(*STREAMS[key])}
    if key in SESSION_HEADER:
        responses["200"]["headers"] = {"X-Session-Id": {"description": "The session the request used",
                                                        "schema": {"type": "string"}}}
    if authenticated:
        operation["security"] = [{"bearer": []}]
        responses["401"] = error(401)
    if gated(key[1]):  # a tenant over --max-concurrent-per-tenant
        responses["429"] = error(429)


def event_stream(event: type[BaseModel], done: bool) -> dict:
    """One event of the stream (what `schema` of text/event-stream describes before OpenAPI 3.2's
    `itemSchema`): its data is JSON, or the closing "[DONE]"."""
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": ref(event)}
    if done:
        data = {"anyOf": [{"const": "[DONE]"}, data]}
    return {"type": "object", "required": ["data"], "properties": {"data": data, "event": {"type": "string"}}}


def error(status: int) -> dict:
    response = {"description": DESCRIPTIONS[status], "content": {"application/json": {"schema": ref(ErrorResponse)}}}
    if status == 429:
        response["headers"] = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}}
    return response


def ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}
