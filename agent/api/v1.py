"""The OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..serving.types import Finished, TokenChunk, UpstreamError
from . import wire
from .errors import ApiError
from .generation import Generation, open_generation, require_tools
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .state import api_state

router = APIRouter(tags=["openai"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.get("/v1/models", summary="Models the household serves")
async def list_models(request: Request) -> Response:
    """OpenAI's model list."""
    st = api_state(request)
    created = int(st.started)
    data = [_model_object(m, created) for m in st.runtime.router.models()]
    return JSONResponse({"object": "list", "data": data})


def _model_object(m: Any, created: int) -> dict[str, Any]:
    """OpenAI's model object; a model run across the household pool also names its members ("pool")."""
    obj: dict[str, Any] = {"id": m.name, "object": "model", "created": created, "owned_by": "hearth"}
    if getattr(m, "pool", ()):
        obj["pool"] = list(m.pool)
    return obj


@router.get("/v1/models/{model:path}", summary="One model")
async def get_model(model: str, request: Request) -> Response:
    """OpenAI's model object, or 404."""
    st = api_state(request)
    for m in st.runtime.router.models():
        if m.name == model:
            return JSONResponse(_model_object(m, int(st.started)))
    raise ApiError(404, f"model '{model}' is not served by this household", param="model",
                   code="model_not_found")


@router.post("/v1/chat/completions", summary="Chat completion (streaming or not)")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """Generate the assistant's next message."""
    st = api_state(request)
    req = body.to_generation()
    if req.tools:
        require_tools(st.runtime.router, req.model)
    gen = await open_generation(st.runtime.router, req, request.receive, st.metrics)
    if body.stream:
        fmt = wire.OpenAIStream("chat", body.model, body.include_usage)
        return StreamingResponse(_sse(gen, fmt), media_type="text/event-stream", headers=SSE_HEADERS)
    return JSONResponse(wire.chat_completion(body.model, await gen.collect(request.receive)))


@router.post("/v1/completions", summary="Text completion (streaming or not)")
async def completions(body: CompletionRequest, request: Request) -> Response:
    """Continue the prompt."""
    st = api_state(request)
    gen = await open_generation(st.runtime.router, body.to_generation(), request.receive, st.metrics)
    if body.stream:
        fmt = wire.OpenAIStream("completion", body.model, body.include_usage)
        return StreamingResponse(_sse(gen, fmt), media_type="text/event-stream", headers=SSE_HEADERS)
    return JSONResponse(wire.text_completion(body.model, await gen.collect(request.receive)))


async def _sse(gen: Generation, fmt: wire.OpenAIStream) -> AsyncIterator[bytes]:
    first = fmt.first()
    if first:
        yield first
    token = fmt.token
    try:
        async for event in gen.rest():
            if type(event) is TokenChunk:
                if event.reasoning or event.tool_calls or event.logprobs:
                    yield fmt.delta(event)
                else:
                    yield token(event.text)
            elif isinstance(event, Finished):
                yield fmt.end(event.finish_reason, event.prompt_tokens, event.completion_tokens)
    except UpstreamError as e:
        # Headers are gone already: the error travels as an SSE event (the openai client raises it).
        yield fmt.error(ApiError.from_upstream(e).openai_body())


@router.post("/v1/embeddings", summary="Embeddings (models that can embed)")
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    """One vector per input text."""
    st = api_state(request)
    info = next((m for m in st.runtime.router.models() if m.name == body.model), None)
    if info is None:
        raise ApiError(404, f"model '{body.model}' is not served by this household", param="model",
                   code="model_not_found")
    if not info.can_embed:
        raise ApiError(400, f"model '{body.model}' cannot make embeddings; serve an embedding model for "
                       "/v1/embeddings", param="model")
    try:
        vectors, prompt_tokens = await st.runtime.router.embed(body.model, body.inputs())
    except UpstreamError as e:
        raise ApiError.from_upstream(e) from None
    if body.dimensions is not None and vectors and body.dimensions != len(vectors[0]):
        raise ApiError(400, f"model '{body.model}' makes {len(vectors[0])}-dimensional embeddings; "
                       f"dimensions={body.dimensions} is not supported", param="dimensions")
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)]
    return JSONResponse({"object": "list", "data": data, "model": body.model,
                         "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        # The openai client asks for base64 by default: little-endian float32, as OpenAI sends it.
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector
