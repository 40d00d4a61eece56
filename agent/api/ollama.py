"""The Ollama subset household apps speak: /api/tags, /api/chat, /api/generate, /api/ps, /api/version.

Model names are listed as ``name:latest`` (Ollama clients expect a tag) and accepted with or without it.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..serving.types import Finished, GenerationRequest, ModelInfo, TokenChunk, UpstreamError
from . import wire
from .errors import ApiError
from .generation import Generation, open_generation
from .schemas import OllamaChatRequest, OllamaGenerateRequest
from .state import api_state

router = APIRouter(tags=["ollama"])

OLLAMA_VERSION = "0.6.0"
"""The Ollama API version Hearth answers as: clients gate features on it; 0.6 has everything here."""


def _tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _model_entry(m: ModelInfo, modified: str) -> dict[str, object]:
    return {
        "name": _tagged(m.name), "model": _tagged(m.name), "modified_at": modified, "size": m.size_bytes,
        "digest": "",
        "details": {"parent_model": "", "format": "gguf", "family": m.family, "families": [m.family] if m.family else [],
                    "parameter_size": "", "quantization_level": m.quantization},
    }


@router.get("/api/version", summary="Ollama API version")
async def version() -> Response:
    """The Ollama version Hearth is compatible with."""
    return JSONResponse({"version": OLLAMA_VERSION})


@router.get("/api/tags", summary="Models (Ollama)")
async def tags(request: Request) -> Response:
    """Every model the household serves."""
    st = api_state(request)
    modified = datetime.fromtimestamp(st.started, UTC).isoformat().replace("+00:00", "Z")
    return JSONResponse({"models": [_model_entry(m, modified) for m in st.runtime.router.models()]})


@router.get("/api/ps", summary="Loaded models (Ollama)")
async def ps(request: Request) -> Response:
    """The models loaded in memory somewhere in the household."""
    st = api_state(request)
    modified = datetime.fromtimestamp(st.started, UTC).isoformat().replace("+00:00", "Z")
    out = []
    for m in st.runtime.router.models():
        if m.loaded:
            entry = _model_entry(m, modified)
            entry.pop("modified_at")
            entry.update({"expires_at": "0001-01-01T00:00:00Z", "size_vram": 0})
            out.append(entry)
    return JSONResponse({"models": out})


@router.post("/api/chat", summary="Chat (Ollama; NDJSON stream unless stream is false)")
async def chat(body: OllamaChatRequest, request: Request) -> Response:
    """The assistant's next message."""
    return await _run(request, body.to_generation(), body.model, body.stream, chat=True)


@router.post("/api/generate", summary="Generate (Ollama; NDJSON stream unless stream is false)")
async def generate(body: OllamaGenerateRequest, request: Request) -> Response:
    """Continue the prompt."""
    return await _run(request, body.to_generation(), body.model, body.stream, chat=False)


async def _run(request: Request, req: GenerationRequest, model: str, stream: bool, chat: bool) -> Response:
    st = api_state(request)
    began = time.perf_counter_ns()
    gen = await open_generation(st.runtime.router, req, request.receive, st.metrics)
    first_ns = time.perf_counter_ns()
    if stream:
        fmt = wire.OllamaStream(chat, model)
        return StreamingResponse(_ndjson(gen, fmt, began, first_ns), media_type="application/x-ndjson")
    text, fin = await gen.collect(request.receive)
    body = wire.ollama_final(chat, model, text, fin.finish_reason, _timings(fin, began, first_ns))
    return JSONResponse(body)


def _timings(fin: Finished, began: int, first_ns: int) -> dict[str, int]:
    end = time.perf_counter_ns()
    return {"total_duration": end - began, "load_duration": 0, "prompt_eval_count": fin.prompt_tokens,
            "prompt_eval_duration": first_ns - began, "eval_count": fin.completion_tokens,
            "eval_duration": end - first_ns}


async def _ndjson(gen: Generation, fmt: wire.OllamaStream, began: int, first_ns: int) -> AsyncIterator[bytes]:
    token = fmt.token
    try:
        async for event in gen.rest():
            if type(event) is TokenChunk:
                yield token(event.text)
            elif isinstance(event, Finished):
                yield fmt.end(event.finish_reason, _timings(event, began, first_ns))
    except UpstreamError as e:
        yield (json.dumps(ApiError.from_upstream(e).ollama_body()) + "\n").encode()
