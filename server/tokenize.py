"""vLLM's /tokenize and /detokenize: the prompt's token ids as the generation endpoints would
read them, and text from ids. `vllm bench serve` calls /tokenize to size its prompts."""

from __future__ import annotations

from fastapi import APIRouter

from . import errors
from .protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from .requests import ServerState, chat_prompt, check_model


def tokenize_router(state: ServerState) -> APIRouter:
    router = APIRouter()
    tokenizer = state.engine.engine.tokenizer

    @router.post("/tokenize")
    async def tokenize(body: TokenizeChatRequest | TokenizeCompletionRequest):
        if body.model is not None:
            check_model(state, body.model)
        if isinstance(body, TokenizeChatRequest):
            ids = chat_prompt(tokenizer, body, body.add_generation_prompt, body.add_special_tokens).ids
        else:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        answer = {"count": len(ids), "max_model_len": state.engine.engine.max_model_len, "tokens": ids,
                  "token_strs": None}
        if body.return_token_strs:
            answer["token_strs"] = [tokenizer.hf.id_to_token(i) for i in ids]
        return answer

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if body.model is not None:
            check_model(state, body.model)
        vocab = state.engine.engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise errors.APIError(400, f"token ids must be in [0, {vocab})", param="tokens", code="invalid_value")
        return {"prompt": tokenizer.decode(body.tokens)}

    return router
