"""This node's models as upstreams: each model's llama-server (serving/llamaserver.py) behind the router.

``ServerUpstream`` bounds the queue (slots + queue_depth, beyond that ``QueueFull``), maps a
``GenerationRequest`` to llama-server's OpenAI-style body with every accepted field explicit
(``server_body``), streams its SSE back as Hearth events (text, thoughts, tool-call deltas, logprobs),
turns a dead server into a clean ``UpstreamError`` (waiting for the restarted one while no token has gone
out) and measures tokens per second. ``Pool`` holds one per model.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from .llamaserver import ServerProcess, ServerSpec, default_chat_format, gguf_facts
from .types import (
    Event,
    Finished,
    GenerationRequest,
    ModelInfo,
    QueueFull,
    TokenChunk,
    UpstreamError,
    UpstreamLoad,
)

_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty")


def forced_tool_schema(request: GenerationRequest) -> dict[str, Any] | None:
    """For tool_choice 'required' or a named function: the JSON schema of the call(s) the answer must be.

    llama-server's own grammar for 'required' still lets the model write text before its call (it only
    requires a call somewhere), and a base model can spend its whole budget on that text. Constraining the
    answer to ``{"name": ..., "arguments": <that tool's parameters>}`` (an array of them with
    parallel_tool_calls) makes the call certain; the server still renders the tools with the template."""
    choice = request.tool_choice
    if not request.tools or not (choice == "required" or isinstance(choice, dict)):
        return None
    wanted = choice["function"]["name"] if isinstance(choice, dict) else None
    options = []
    for tool in request.tools:
        fn = tool.get("function") or {}
        if wanted is not None and fn.get("name") != wanted:
            continue
        params = fn.get("parameters") or {"type": "object"}
        options.append({"type": "object", "properties": {"name": {"const": fn.get("name")}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    one: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    if request.parallel_tool_calls:
        return {"type": "array", "items": one, "minItems": 1}
    return one


def server_body(request: GenerationRequest) -> tuple[str, dict[str, Any]]:
    """The llama-server endpoint and body for *request*: every field Hearth accepted, explicitly."""
    body: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
    for name in _SAMPLING:
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.seed is not None:
        body["seed"] = request.seed
        # A reused prompt prefix changes the logits in the last bits (one token evaluated alone instead of
        # in a batch), enough to flip a near-tie: a seeded request asks to repeat exactly.
        body["cache_prompt"] = False
    if request.stop:
        body["stop"] = list(request.stop)
    for key, value in request.extra.items():
        if key != "num_ctx":
            body[key] = value
    if request.response_format is not None:
        body["response_format"] = request.response_format
    if request.logprobs:
        body["logprobs"] = True if request.kind == "chat" else max(1, request.top_logprobs or 1)
        if request.kind == "chat" and request.top_logprobs:
            body["top_logprobs"] = request.top_logprobs
    if request.kind == "completion":
        body["prompt"] = request.prompt
        return "/v1/completions", body
    body["messages"] = list(request.messages)
    if request.tools:
        body["tools"] = list(request.tools)
        forced = forced_tool_schema(request)
        if forced is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": forced}}
        else:
            if request.tool_choice is not None:
                body["tool_choice"] = request.tool_choice
            if request.parallel_tool_calls is not None:
                body["parallel_tool_calls"] = request.parallel_tool_calls
    if request.think is not None:
        body["chat_template_kwargs"] = {"enable_thinking": bool(request.think)}
    return "/v1/chat/completions", body


class ServerUpstream:
    """This node's llama-server for one model, as an Upstream (node 'local')."""

    node = "local"

    def __init__(self, server: ServerProcess, queue_depth: int = 8, ready_wait: float = 30.0) -> None:
        self.worker = server
        self.model = server.spec.name
        self.slots = max(1, server.spec.slots)
        self.capacity = self.slots + queue_depth
        self.ready_wait = ready_wait
        self._queued = 0
        self.tokens_per_second = 0.0
        self.requests = 0
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.errors = 0
        self._client: httpx.AsyncClient | None = None

    def load(self) -> UpstreamLoad:
        """Queue length, capacity and measured speed, for routing."""
        return UpstreamLoad(queued=self._queued, capacity=self.capacity,
                            tokens_per_second=self.tokens_per_second, loaded=self.worker.state == "ready")

    def info(self) -> ModelInfo:
        """What /v1/models says about this model."""
        i = self.worker.info
        return ModelInfo(name=self.model, nodes=("local",), loaded=self.worker.state == "ready",
                         context_length=int(i.get("context_length", 0)), size_bytes=int(i.get("size_bytes", 0)),
                         can_embed=bool(i.get("can_embed", False)), family=str(i.get("family", "")),
                         quantization=str(i.get("quantization", "")), tools=bool(i.get("tools", False)),
                         slots=int(i.get("slots", self.slots)))

    def _retry_after(self) -> float:
        # About how long the requests ahead take: an honest hint for Retry-After.
        ahead = max(0, self._queued - self.slots + 1)
        return max(1.0, round(ahead * 256 / self.tokens_per_second)) if self.tokens_per_second else 1.0

    def _http(self) -> httpx.AsyncClient:
        if self._client is None or self._client.is_closed:
            self._client = self.worker.client(timeout=None)
        return self._client

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream one generation from the server; closing this iterator cancels it there."""
        if self._queued >= self.capacity:
            raise QueueFull(self.model, retry_after=self._retry_after())
        self._queued += 1
        try:
            await self._admit_ready()
            deadline = time.monotonic() + self.ready_wait
            while True:
                try:
                    async for event in self._stream(request):
                        yield event
                    return
                except _ServerGone as e:
                    # Nothing reached the client and the server is dying or restarting: the request is as
                    # good as new, so wait for the next server instead of failing.
                    if not e.before_first_token or time.monotonic() >= deadline or self.worker.state == "stopped":
                        raise UpstreamError(e.message, status=e.status, hint=e.hint,
                                            before_first_token=e.before_first_token, retry_after=1.0) from None
                await asyncio.sleep(0.05)
                await self.worker.wait_ready(max(0.0, deadline - time.monotonic()))
        finally:
            self._queued -= 1

    async def _admit_ready(self) -> None:
        if not self.worker.ready.is_set():
            if self.worker.state == "failed" and self.worker.restarts > 2:
                raise UpstreamError(f"model '{self.model}' failed to load: {self.worker.error}", status=503,
                                    retry_after=5.0)
            if not await self.worker.wait_ready(self.ready_wait):
                raise UpstreamError(f"model '{self.model}' is not ready yet", status=503, retry_after=5.0)

    async def _capped(self, path: str, body: dict[str, Any], num_ctx: int) -> None:
        """Honour a per-request context smaller than the slot's: the answer may use what the prompt leaves."""
        client = self._http()
        try:
            if "messages" in body:
                r = await client.post("/apply-template", json={k: body[k] for k in ("messages", "tools") if k in body})
                prompt = r.json()["prompt"]
            else:
                prompt = body["prompt"]
            n = len((await client.post("/tokenize", json={"content": prompt, "add_special": True})).json()["tokens"])
        except (httpx.HTTPError, OSError, ValueError, KeyError) as e:
            raise _ServerGone(f"model '{self.model}' server failed to count the prompt: {e}", status=503) from None
        if n >= num_ctx:
            raise UpstreamError(f"the prompt is {n} tokens but options.num_ctx is {num_ctx}", status=400,
                                hint="raise options.num_ctx or shorten the conversation")
        body["max_tokens"] = min(int(body.get("max_tokens") or num_ctx), num_ctx - n)

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        self.requests += 1
        path, body = server_body(request)
        forced = forced_tool_schema(request) is not None
        held: list[str] = []
        num_ctx = request.extra.get("num_ctx")
        if num_ctx and num_ctx < int(self.worker.info.get("context_length") or 0):
            await self._capped(path, body, int(num_ctx))
        chat = request.kind == "chat"
        first = 0.0
        pieces = 0
        reason = "stop"
        usage: dict[str, Any] = {}
        try:
            async with self._http().stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    raise _refusal(self.model, r.status_code, await r.aread())
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise _refusal(self.model, int(chunk["error"].get("code") or 500), data.encode(),
                                       before_first_token=pieces == 0)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        event = _event(choice, chat)
                        if choice.get("finish_reason"):
                            reason = choice["finish_reason"]
                        if event is not None and forced:
                            held.append(event.text)  # the call's JSON: sent whole once it is complete
                            continue
                        if event is not None:
                            if not pieces:
                                first = time.perf_counter()
                            pieces += 1
                            yield event
        except (httpx.TransportError, OSError) as e:
            self.errors += 1
            if self.worker.state != "ready" or isinstance(e, httpx.ConnectError | httpx.RemoteProtocolError | OSError):
                raise _ServerGone(f"model '{self.model}' server stopped during the generation ({e})", status=503,
                                  before_first_token=pieces == 0, retry_after=1.0) from None
            raise UpstreamError(f"model '{self.model}' server failed: {e}", status=502,
                                before_first_token=pieces == 0) from None
        except (ValueError, KeyError, TypeError) as e:
            self.errors += 1
            raise UpstreamError(f"model '{self.model}' server answered garbage: {e}", status=502,
                                before_first_token=pieces == 0) from None
        n_prompt = int(usage.get("prompt_tokens") or 0)
        n_done = int(usage.get("completion_tokens") or 0)
        if forced:
            calls = _forced_calls("".join(held))
            if calls:
                reason = "tool_calls"
                yield TokenChunk("", tool_calls=calls)
            elif held:
                yield TokenChunk("".join(held))  # cut off before the call was complete: say what came
        self._account(n_prompt, n_done, first)
        yield Finished(_finish(reason), n_prompt, n_done, served_by="local")

    def _account(self, n_prompt: int, n_done: int, first: float) -> None:
        self.prompt_tokens += n_prompt
        self.tokens_generated += n_done
        if n_done > 4 and first:
            speed = (n_done - 1) / max(1e-6, time.perf_counter() - first)
            self.tokens_per_second = speed if not self.tokens_per_second else 0.7 * self.tokens_per_second + 0.3 * speed

    async def embed(self, model: str, inputs: list[str]) -> tuple[list[list[float]], int]:
        """Embeddings from the server; UpstreamError(400) when the model cannot embed."""
        if not self.worker.spec.embedding:
            raise UpstreamError(f"model '{self.model}' does not provide embeddings", status=400,
                                hint="serve an embedding model (a GGUF with a pooling head) for embeddings")
        if self._queued >= self.capacity:
            raise QueueFull(self.model, retry_after=self._retry_after())
        self._queued += 1
        try:
            await self._admit_ready()
            try:
                r = await self._http().post("/v1/embeddings", json={"input": list(inputs), "encoding_format": "float"})
            except (httpx.HTTPError, OSError) as e:
                raise UpstreamError(f"model '{self.model}' server failed: {e}", status=503) from None
        finally:
            self._queued -= 1
        if r.status_code != 200:
            raise _refusal(self.model, r.status_code, r.content)
        data = r.json()
        vectors = [d["embedding"] for d in sorted(data["data"], key=lambda d: d["index"])]
        return vectors, int((data.get("usage") or {}).get("prompt_tokens") or 0)

    async def close(self) -> None:
        """Close the connection pool to the server."""
        if self._client is not None:
            await self._client.aclose()


def _event(choice: dict[str, Any], chat: bool) -> TokenChunk | None:
    """One SSE choice as a TokenChunk (text, reasoning, tool-call deltas, logprobs), or None when empty."""
    logprobs = choice.get("logprobs")
    lp: tuple[dict[str, Any], ...] = ()
    if isinstance(logprobs, dict) and logprobs.get("content"):
        lp = tuple(logprobs["content"])
    if not chat:
        text = choice.get("text") or ""
        if isinstance(logprobs, dict) and logprobs.get("tokens"):
            lp = ({"completion": logprobs},)
        return TokenChunk(text, logprobs=lp) if text or lp else None
    delta = choice.get("delta") or {}
    text = delta.get("content") or ""
    reasoning = delta.get("reasoning_content") or ""
    calls = tuple(delta.get("tool_calls") or ())
    if not (text or reasoning or calls or lp):
        return None
    return TokenChunk(text, reasoning=reasoning, tool_calls=calls, logprobs=lp)


def _forced_calls(text: str) -> tuple[dict[str, Any], ...]:
    """The tool calls in a forced call's JSON (one object or an array), as OpenAI-style deltas."""
    try:
        data = json.loads(text)
    except ValueError:
        return ()
    items = data if isinstance(data, list) else [data]
    calls = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            calls.append({"index": i, "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                          "function": {"name": item["name"], "arguments": json.dumps(item.get("arguments", {}))}})
    return tuple(calls)


def _finish(reason: str) -> Any:
    return reason if reason in ("stop", "length", "tool_calls") else "stop"


def _refusal(model: str, status: int, raw: bytes, before_first_token: bool = True) -> UpstreamError:
    """llama-server's error answer as an UpstreamError with its own message (4xx stay 4xx)."""
    try:
        err = json.loads(raw).get("error") or {}
        message = err.get("message") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        message = raw.decode(errors="replace")[:300]
    message = message or f"status {status}"
    if 400 <= status < 500:
        hint = "shorten the prompt or the conversation" if "context" in message else None
        return UpstreamError(message, status=400, hint=hint, before_first_token=before_first_token)
    return UpstreamError(f"model '{model}': {message}", status=502 if status != 503 else 503,
                         before_first_token=before_first_token)


class _ServerGone(UpstreamError):
    """The server's connection broke (it died or is restarting)."""


class Pool:
    """Every local model server of this node, by model name."""

    def __init__(self, run_dir: Path, queue_depth: int = 8) -> None:
        self.run_dir = run_dir
        self.queue_depth = queue_depth
        self.upstreams: dict[str, ServerUpstream] = {}

    def add(self, name: str, model_path: Path, upstream_type: type[ServerUpstream] | None = None,
            **options: Any) -> ServerUpstream:
        """Start supervising a llama-server for *model_path* served as *name* (through *upstream_type*,
        ServerUpstream unless told: hearth.pool gives its own)."""
        facts = gguf_facts(Path(model_path))
        options.setdefault("embedding", bool(facts.get("embedding")))
        if not options.get("chat_format"):
            options["chat_format"] = default_chat_format(facts)
        known = {f for f in ServerSpec.__dataclass_fields__}
        spec = ServerSpec(name=name, model_path=Path(model_path), socket_path=self.socket_for(name),
                          **{k: v for k, v in options.items() if k in known})
        server = ServerProcess(spec)
        upstream = (upstream_type or ServerUpstream)(server, queue_depth=self.queue_depth)
        self.upstreams[name] = upstream
        server.start()
        return upstream

    def socket_for(self, name: str) -> Path:
        """The Unix socket of *name*'s server: in the run directory (0750, the agent's own), or, where that
        path would pass the 108 bytes a socket path may have, in a private 0700 folder under /tmp."""
        path = self.run_dir / f"{_safe(name)}.sock"
        if len(os.fsencode(path)) < 100:
            return path
        digest = hashlib.sha256(os.fsencode(self.run_dir)).hexdigest()[:12]
        short = Path(tempfile.gettempdir()) / f"hearth-{os.getuid()}-{digest}"
        short.mkdir(mode=0o700, exist_ok=True)
        return short / f"{hashlib.sha256(name.encode()).hexdigest()[:12]}.sock"

    async def remove(self, name: str, timeout: float = 5.0) -> None:
        """Stop serving *name*: its server is stopped and forgotten (the router must drop it first)."""
        upstream = self.upstreams.pop(name, None)
        if upstream is not None:
            await upstream.worker.stop(timeout)
            await upstream.close()

    def workers(self) -> Sequence[ServerProcess]:
        """The supervised servers."""
        return [u.worker for u in self.upstreams.values()]

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop every server (in parallel)."""
        await asyncio.gather(*(w.stop(timeout) for w in self.workers()), return_exceptions=True)
        for u in self.upstreams.values():
            await u.close()


def _safe(name: str) -> str:
    # The socket path must end in .sock (that is how llama-server tells a socket from a host name) and
    # stay under the 108 bytes of sun_path.
    return ("".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "model")


