"""The contract between the API, the router, local workers and mesh peers.

A request becomes a ``GenerationRequest``; whoever serves it (a local worker process or a peer node)
is an ``Upstream`` that yields ``TokenChunk``s and ends with one ``Finished``. The same JSON form
(``to_json``/``from_json``) travels to a worker over its socket and to a peer over the mesh.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from ..errors import HearthError

Kind = Literal["chat", "completion"]


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, already validated by the API; sampling parameters are explicit, never implied."""

    model: str
    kind: Kind
    messages: tuple[dict[str, Any], ...] = ()
    """Chat messages (role/content dicts) when kind == 'chat'."""
    prompt: str = ""
    """The prompt when kind == 'completion'."""
    max_tokens: int | None = None
    """Tokens to generate at most; None means until the context is full."""
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: tuple[str, ...] = ()
    tools: tuple[dict[str, Any], ...] = ()
    """OpenAI-style tool definitions ({"type": "function", "function": {...}}), chat only."""
    tool_choice: Any = None
    """'auto', 'none', 'required' or {"type": "function", "function": {"name": ...}}; None means auto."""
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    """OpenAI's response_format (json_object, or json_schema with a schema): grammar-constrained output."""
    logprobs: bool = False
    top_logprobs: int | None = None
    think: bool | None = None
    """A thinking model thinks (True), answers at once (False), or does what its template does (None)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """More llama-server sampling fields, as they are (typical_p, repeat_last_n, mirostat*, n_keep,
    logit_bias), and num_ctx: a cap on prompt + answer (Ollama's per-request context)."""
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    hops: int = 0
    """How many mesh hops this request has taken (a peer never forwards a request again)."""

    def to_json(self) -> dict[str, Any]:
        """Plain data for the worker socket and the mesh."""
        d = dataclasses.asdict(self)
        d["messages"] = list(self.messages)
        d["stop"] = list(self.stop)
        d["tools"] = list(self.tools)
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationRequest:
        """The inverse of to_json; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        kw["messages"] = tuple(kw.get("messages") or ())
        kw["stop"] = tuple(kw.get("stop") or ())
        kw["tools"] = tuple(kw.get("tools") or ())
        return cls(**kw)


@dataclass(frozen=True)
class TokenChunk:
    """A piece of the answer: text (whole UTF-8 characters only), and where the model gives them, thoughts,
    tool-call deltas (OpenAI's streamed form: index, id, function name, a piece of the arguments) and
    logprobs."""

    text: str
    reasoning: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()
    logprobs: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Plain data for the mesh: only the parts present."""
        d: dict[str, Any] = {"t": self.text}
        if self.reasoning:
            d["r"] = self.reasoning
        if self.tool_calls:
            d["c"] = list(self.tool_calls)
        if self.logprobs:
            d["lp"] = list(self.logprobs)
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenChunk:
        """The inverse of to_json."""
        return cls(str(data.get("t", "")), str(data.get("r", "")), tuple(data.get("c") or ()),
                   tuple(data.get("lp") or ()))


@dataclass(frozen=True)
class Finished:
    """The end of a generation: why it stopped and the usage counts."""

    finish_reason: Literal["stop", "length", "tool_calls", "cancelled"]
    prompt_tokens: int
    completion_tokens: int
    served_by: str = ""
    """The node id (or 'local') that generated the text."""


Event = TokenChunk | Finished


class UpstreamError(HearthError):
    """An upstream could not serve a request. ``status`` is the HTTP status the API should answer with.

    ``before_first_token`` is True when no text has reached the client yet, so the router may try the
    next upstream. ``param`` names the request field at fault, for a 400.
    """

    def __init__(self, message: str, status: int = 503, hint: str | None = None,
                 before_first_token: bool = True, retry_after: float | None = None, param: str | None = None) -> None:
        super().__init__(message, hint)
        self.status = status
        self.before_first_token = before_first_token
        self.retry_after = retry_after
        self.param = param


class QueueFull(UpstreamError):
    """The model's queue is full: the API answers 429 with Retry-After."""

    def __init__(self, model: str, retry_after: float = 1.0) -> None:
        super().__init__(f"model '{model}' is busy: its queue is full", status=429,
                         hint="retry after a moment", retry_after=retry_after)


class ModelNotFound(UpstreamError):
    """No node of the household serves the model: the API answers 404."""

    def __init__(self, model: str) -> None:
        super().__init__(f"model '{model}' is not served by this household", status=404,
                         hint="GET /v1/models lists the models served")


@dataclass(frozen=True)
class UpstreamLoad:
    """How busy an upstream is, for routing: fewer waiting per slot and more speed win."""

    queued: int
    """Requests running or waiting."""
    capacity: int
    """Requests it accepts at once before 429 (running + queue)."""
    tokens_per_second: float = 0.0
    """Measured generation speed, 0 when unknown."""
    loaded: bool = True
    """The model is in memory (not just on disk)."""

    @property
    def headroom(self) -> float:
        """Free fraction of capacity, 0..1."""
        return max(0.0, 1.0 - self.queued / self.capacity) if self.capacity else 0.0


@runtime_checkable
class Upstream(Protocol):
    """Something that can generate for one model: a local worker, or a peer node."""

    node: str
    """'local' for this node's worker, else the peer's node id."""
    model: str

    def load(self) -> UpstreamLoad:
        """Its current load, cheap to call."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream the generation; raises UpstreamError. Closing the iterator cancels the generation."""
        ...

    async def embed(self, model: str, inputs: list[str]) -> tuple[list[list[float]], int]:
        """Embeddings and prompt-token count; UpstreamError(400) when the model cannot embed."""
        ...


@dataclass(frozen=True)
class ModelInfo:
    """A model the household serves, for /v1/models, /api/tags and /api/ps."""

    name: str
    nodes: tuple[str, ...] = ("local",)
    """Nodes that have it loaded ('local' for this one)."""
    loaded: bool = True
    context_length: int = 0
    size_bytes: int = 0
    can_embed: bool = False
    family: str = ""
    quantization: str = ""
    tools: bool = False
    """The model's template can call tools."""
    slots: int = 1
    """Requests it generates at once (continuous batching)."""
    pool: tuple[str, ...] = ()
    """Members, when the model runs across several nodes."""


class Router(Protocol):
    """Chooses an upstream per request (loaded, most headroom, local first on ties) and fails over
    to the next one while no token has reached the client."""

    def models(self) -> list[ModelInfo]:
        """Every model the household serves, merged across nodes."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream from the best upstream; raises ModelNotFound, QueueFull or UpstreamError."""
        ...

    async def embed(self, model: str, inputs: list[str]) -> tuple[list[list[float]], int]:
        """Embeddings from an upstream that has the model."""
        ...
