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
import logging
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from ..errors import HearthError
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

log = logging.getLogger(__name__)

_TRIGGER_WORD = 1
"""COMMON_GRAMMAR_TRIGGER_TYPE_WORD in llama.cpp's common/common.h: a trigger that is literal text."""

_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty")


PROBE_TOOL = {"type": "function", "function": {"name": "probe", "description": "A probe",
                                               "parameters": {"type": "object", "properties": {}}}}
"""A tool for asking llama-server how this model's template opens a tool call (see ServerUpstream.call_opener)."""


def forces_call(request: GenerationRequest) -> bool:
    """tool_choice 'required' or a named function: the answer must be a tool call."""
    return bool(request.tools) and (request.tool_choice == "required" or isinstance(request.tool_choice, dict))


def one_call(request: GenerationRequest) -> bool:
    """At most one tool call: parallel_tool_calls false, or a forced call unless parallel_tool_calls is true
    (a forced call must come, and one is what was asked for; a base model would otherwise repeat it)."""
    return request.parallel_tool_calls is False or (forces_call(request) and request.parallel_tool_calls is not True)


def server_body(request: GenerationRequest, call_opener: str = "") -> tuple[str, dict[str, Any]]:
    """The llama-server endpoint and body for *request*: every field Hearth accepted, explicitly.

    A call that must be made (``forces_call``) is left to llama.cpp, which writes it in the model family's own
    syntax through the template's tool-call grammar and parses it back: a named function becomes 'required'
    over that one tool (llama-server knows only auto/none/required). llama.cpp's 'required' grammar still lets
    the model write text before the call, and a base model can spend its whole budget there, so the answer
    is begun with *call_opener*, the text that opens a call in this template (``ServerUpstream.call_opener``),
    as a prefilled assistant turn: from there the grammar allows nothing but the call. Where each call opens
    with its own marker (Qwen's and Hermes' ``<tool_call>``), llama.cpp's grammar allows more calls even with
    parallel_tool_calls false; the marker is then a stop string, so the answer ends where a second call
    would begin."""
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
        tools, choice = list(request.tools), request.tool_choice
        if isinstance(choice, dict):
            wanted = choice["function"]["name"]
            tools = [t for t in tools if (t.get("function") or {}).get("name") == wanted]
            choice = "required"
        body["tools"] = tools
        if choice is not None:
            body["tool_choice"] = choice
        if request.parallel_tool_calls is not None or choice == "required":
            body["parallel_tool_calls"] = not one_call(request)
        if choice == "required" and call_opener:
            body["messages"].append({"role": "assistant", "content": call_opener})
            if one_call(request) and not call_opener.startswith("{"):
                body["stop"] = [*body.get("stop", ()), call_opener.strip()]
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
        self._opener = ""
        self._opener_pid: int | None = None

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
        opener = await self.call_opener() if forces_call(request) else ""
        path, body = server_body(request, opener)
        num_ctx = request.extra.get("num_ctx")
        if num_ctx and num_ctx < int(self.worker.info.get("context_length") or 0):
            await self._capped(path, body, int(num_ctx))
        chat = request.kind == "chat"
        # llama.cpp's grammar allows a second call after the first in some formats (see server_body).
        single = one_call(request)
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
                        if single and event is not None and event.tool_calls:
                            event = _first_call_only(event)
                        if choice.get("finish_reason"):
                            reason = choice["finish_reason"]
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
        self._account(n_prompt, n_done, first)
        yield Finished(_finish(reason), n_prompt, n_done, served_by="local")

    async def call_opener(self) -> str:
        """The text that opens a tool call in this model's template ('' when unknown), asked of llama.cpp once
        per server: its template analysis makes the lazy tool-call grammar of tool_choice 'auto' wake on that
        text (the grammar's trigger word), which a one-token request with ``verbose`` reports. A template
        whose calls are bare JSON objects (Llama 3.x) has no trigger: its calls open with '{', which is where
        llama.cpp's own parser looks for them too."""
        pid = self.worker.pid
        if pid is not None and pid == self._opener_pid:
            return self._opener
        body = {"messages": [{"role": "user", "content": "Hello"}], "tools": [PROBE_TOOL], "tool_choice": "auto",
                "max_tokens": 1, "temperature": 0.0, "verbose": True}
        try:
            r = await self._http().post("/v1/chat/completions", json=body)
            settings = r.json()["__verbose"]["generation_settings"]
            words = [t.get("value") for t in settings.get("grammar_triggers") or () if t.get("type") == _TRIGGER_WORD]
        except (httpx.HTTPError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("model %s: could not ask llama-server how a tool call opens (%s)", self.model, e)
            return ""
        self._opener = next((w for w in words if isinstance(w, str) and w and not w.startswith("{")), "{")
        self._opener_pid = pid
        log.info("model %s: a tool call opens with %r", self.model, self._opener)
        return self._opener

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
            err = _refusal(self.model, r.status_code, r.content)
            if re.search(r"too large|context|exceed", err.message):
                # llama-server answers 500 for an input longer than it reads at once: the input's fault.
                raise UpstreamError(f"an input is too long for model '{self.model}': {err.message}", status=400,
                                    param="input", hint=f"inputs must fit the model's {self.worker.info.get('context_length', '?')}-token "
                                    "context: shorten or split them")
            raise err
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


def _first_call_only(event: TokenChunk) -> TokenChunk | None:
    """*event* without deltas of a second or later tool call (parallel_tool_calls false); None if empty."""
    calls = tuple(c for c in event.tool_calls if int(c.get("index", 0)) == 0)
    if len(calls) == len(event.tool_calls):
        return event
    if not (calls or event.text or event.reasoning or event.logprobs):
        return None
    return TokenChunk(event.text, reasoning=event.reasoning, tool_calls=calls, logprobs=event.logprobs)


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
            options["chat_format"] = _catalogue_chat_format(Path(model_path)) or default_chat_format(facts)
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


def _catalogue_chat_format(model_path: Path) -> str:
    """The template the catalogue names for this file (Mistral Small 3's GGUFs carry one without tools:
    Hearth's own replaces it), by the store's file name; '' when the catalogue has nothing to say."""
    try:
        from ..models.catalogue import load
    except ImportError:
        return ""
    try:
        entry = load().by_file(model_path.name)
    except (HearthError, OSError):
        return ""
    return (entry.chat_format or "") if entry is not None else ""
