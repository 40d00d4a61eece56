"""The Ollama API household apps speak: /api/tags, /api/chat, /api/generate, /api/show, /api/embed,
/api/pull, /api/ps, /api/version.

Model names are listed as ``name:latest`` (Ollama clients expect a tag) and accepted with or without it.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..errors import HearthError
from ..serving.types import Finished, GenerationRequest, ModelInfo, TokenChunk, UpstreamError
from . import wire
from .errors import ApiError
from .generation import Generation, merge_tool_call, open_generation, require_tools
from .schemas import (
    OllamaChatRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaPullRequest,
    OllamaShowRequest,
    ollama_model,
)
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


NEVER_EXPIRES = "2318-08-18T00:00:00Z"
"""Ollama's expires_at for a model kept loaded for good (keep_alive -1): what Hearth does with its models."""


@router.get("/api/ps", summary="Loaded models (Ollama)")
async def ps(request: Request) -> Response:
    """The models loaded in memory somewhere in the household, with their real sizes."""
    st = api_state(request)
    local = _local_facts(st)
    out = []
    for m in st.runtime.router.models():
        if m.loaded:
            entry = _model_entry(m, "")
            entry.pop("modified_at")
            facts = local.get(m.name) or {}
            weights = (facts.get("offload") or {}).get("weights_mib") or {}
            vram = sum(v for k, v in weights.items() if not k.upper().startswith("CPU")) * (1 << 20)
            entry.update({"expires_at": NEVER_EXPIRES, "size_vram": int(vram), "context_length": m.context_length})
            out.append(entry)
    return JSONResponse({"models": out})


def _named(body: OllamaShowRequest | OllamaPullRequest) -> str:
    """The model a show or pull asks about: 'model', or the older 'name' (Ollama accepts both)."""
    name = ollama_model(body.model or body.name or "")
    if not name:
        raise ApiError(400, "'model' is required", param="model")
    return name


def _local_facts(st: Any) -> dict[str, dict[str, Any]]:
    """Each local model's facts as its server reported them (offload, template caps), by name."""
    health = st.runtime.health()
    return {name: info for name, info in (health.get("models") or {}).items() if isinstance(info, dict)}


@router.post("/api/show", summary="One model's details and capabilities (Ollama)")
async def show(body: OllamaShowRequest, request: Request) -> Response:
    """Context length, family, quantization and what the model can do (completion, tools, embedding)."""
    st = api_state(request)
    wanted = _named(body)
    m = next((m for m in st.runtime.router.models() if m.name == wanted), None)
    if m is None:
        raise ApiError(404, f"model '{wanted}' not found", param="model", code="model_not_found")
    caps = ["embedding"] if m.can_embed else ["completion"]
    if m.tools:
        caps.append("tools")
    arch = m.family or "unknown"
    info: dict[str, Any] = {"general.architecture": arch, f"{arch}.context_length": m.context_length}
    details = {"parent_model": "", "format": "gguf", "family": m.family, "families": [m.family] if m.family else [],
               "parameter_size": "", "quantization_level": m.quantization}
    return JSONResponse({"modelfile": f"FROM {m.name}\n", "parameters": f"num_ctx {m.context_length}",
                         "template": "", "details": details, "model_info": info, "capabilities": caps,
                         "modified_at": datetime.fromtimestamp(st.started, UTC).isoformat().replace("+00:00", "Z")})


@router.post("/api/embed", summary="Embeddings (Ollama)")
async def embed(body: OllamaEmbedRequest, request: Request) -> Response:
    """One vector per input, from a model that can embed."""
    st = api_state(request)
    model = ollama_model(body.model)
    inputs = body.inputs()
    if body.options is not None:
        body.options.common()  # refuses load-time options like every other endpoint
    info = next((m for m in st.runtime.router.models() if m.name == model), None)
    if info is None:
        raise ApiError(404, f"model '{model}' not found", param="model", code="model_not_found")
    if not info.can_embed:
        raise ApiError(400, f"model '{model}' cannot make embeddings; serve an embedding model", param="model")
    began = time.perf_counter_ns()
    try:
        vectors, prompt_tokens = await st.runtime.router.embed(model, inputs)
    except UpstreamError as e:
        raise ApiError.from_upstream(e) from None
    if body.dimensions is not None and vectors and body.dimensions != len(vectors[0]):
        raise ApiError(400, f"model '{model}' makes {len(vectors[0])}-dimensional embeddings; dimensions="
                       f"{body.dimensions} is not supported", param="dimensions")
    return JSONResponse({"model": body.model, "embeddings": vectors, "prompt_eval_count": prompt_tokens,
                         "total_duration": time.perf_counter_ns() - began, "load_duration": 0})


@router.post("/api/pull", summary="Fetch a catalogue model into the store and serve it (Ollama)")
async def pull(body: OllamaPullRequest, request: Request) -> Response:
    """Streams Ollama's progress lines (status, total, completed) and ends with success or an error."""
    st = api_state(request)
    name = _named(body)
    for field_name in ("insecure", "username", "password"):
        if getattr(body, field_name):
            raise ApiError(400, f"'{field_name}' is not supported: Hearth pulls from its catalogue's sources",
                           param=field_name)
    puller = getattr(st.runtime, "pull", None)
    if puller is None:
        raise ApiError(400, "this node cannot pull models", param="model")
    events = puller(name)
    try:
        first = await events.__anext__()
    except HearthError as e:
        raise ApiError(404 if "catalogue" in e.message else 400, e.message, param="model") from None
    if not body.stream:
        last = first
        try:
            async for event in events:
                last = event
        except HearthError as e:
            raise ApiError(500, e.message) from None
        return JSONResponse(last)

    async def lines() -> AsyncIterator[bytes]:
        yield (json.dumps(first) + "\n").encode()
        try:
            async for event in events:
                yield (json.dumps(event) + "\n").encode()
        except HearthError as e:
            yield (json.dumps({"error": e.message}) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


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
    if req.tools:
        require_tools(st.runtime.router, req.model)
    began = time.perf_counter_ns()
    gen = await open_generation(st.runtime.router, req, request.receive, st.metrics)
    first_ns = time.perf_counter_ns()
    if stream:
        fmt = wire.OllamaStream(chat, model)
        return StreamingResponse(_ndjson(gen, fmt, began, first_ns), media_type="application/x-ndjson")
    answer = await gen.collect(request.receive)
    body = wire.ollama_final(chat, model, answer.text, answer.finished.finish_reason,
                            _timings(answer.finished, began, first_ns), thinking=answer.reasoning,
                            tool_calls=ollama_tool_calls(answer.tool_calls), logprobs=answer.logprobs)
    return JSONResponse(body)


def ollama_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-form tool calls (arguments a JSON string) in Ollama's form (arguments an object)."""
    out = []
    for i, c in enumerate(calls):
        fn = c.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            args = {"_raw": fn.get("arguments")}
        out.append({"id": c.get("id") or f"call_{i}", "function": {"index": i, "name": fn.get("name", ""),
                                                                  "arguments": args}})
    return out


def _timings(fin: Finished, began: int, first_ns: int) -> dict[str, int]:
    end = time.perf_counter_ns()
    return {"total_duration": end - began, "load_duration": 0, "prompt_eval_count": fin.prompt_tokens,
            "prompt_eval_duration": first_ns - began, "eval_count": fin.completion_tokens,
            "eval_duration": end - first_ns}


async def _ndjson(gen: Generation, fmt: wire.OllamaStream, began: int, first_ns: int) -> AsyncIterator[bytes]:
    token = fmt.token
    calls: dict[int, dict[str, Any]] = {}
    try:
        async for event in gen.rest():
            if type(event) is TokenChunk:
                if event.tool_calls:
                    # Ollama sends whole tool calls (arguments an object): gather the deltas first.
                    for delta in event.tool_calls:
                        merge_tool_call(calls, delta)
                if event.reasoning:
                    yield fmt.thinking(event.reasoning)
                if event.logprobs:
                    yield fmt.token_with_logprobs(event.text, list(event.logprobs))
                elif event.text:
                    yield token(event.text)
            elif isinstance(event, Finished):
                if calls:
                    yield fmt.tool_calls(ollama_tool_calls([calls[i] for i in sorted(calls)]))
                yield fmt.end(event.finish_reason, _timings(event, began, first_ns))
    except UpstreamError as e:
        yield (json.dumps(ApiError.from_upstream(e).ollama_body()) + "\n").encode()
