"""Request bodies of the OpenAI- and Ollama-style endpoints, and how each becomes a GenerationRequest.

The models describe the bodies in the OpenAPI document (schemathesis fuzzes from it) and validate them;
unknown fields are ignored, as most OpenAI-compatible servers do, so clients that send extras still work.

Sampling defaults are explicit (``DEFAULTS``) and are llama.cpp's own, with one deliberate difference from
``llama_cpp.server``: ``repeat_penalty`` is 1.0 (no penalty), as in OpenAI's API and llama-cpp-python's
Python API, where ``llama_cpp.server`` silently uses 1.1.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..serving.types import GenerationRequest
from .errors import ApiError

DEFAULTS = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}
"""Sampling when a request does not say: llama.cpp's defaults, repeat_penalty 1.0."""

MAX_TOKENS_LIMIT = 1 << 20
_Float = Annotated[float, Field(allow_inf_nan=False)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
Unit = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=0, le=100_000)]
Penalty = Annotated[float, Field(ge=0.0, le=10.0, allow_inf_nan=False)]
OpenAIPenalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]
Seed = Annotated[int, Field(ge=-(1 << 63), le=(1 << 64) - 1)]
Stop = str | Annotated[list[str], Field(max_length=16)]
ModelName = Annotated[str, Field(min_length=1, max_length=256)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    """One part of a multi-part message; only text parts are understood."""

    type: str
    text: str | None = None


class ChatMessage(_Body):
    """One chat message."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(_Body):
    """OpenAI's stream options."""

    include_usage: bool = False


class ResponseFormat(_Body):
    """Only plain text answers are produced."""

    type: str = "text"


class _Sampling(_Body):
    temperature: Temperature | None = None
    top_p: Unit | None = None
    top_k: TopK | None = None
    min_p: Unit | None = None
    repeat_penalty: Penalty | None = None
    presence_penalty: OpenAIPenalty | None = None
    """Accepted for compatibility and ignored (llama.cpp's repeat_penalty is the supported penalty)."""
    frequency_penalty: OpenAIPenalty | None = None
    """Accepted for compatibility and ignored."""
    seed: Seed | None = None
    stop: Stop | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def _common(self, max_tokens: int | None) -> dict[str, Any]:
        if self.n not in (None, 1):
            raise ApiError(400, "n > 1 is not supported: send one request per completion", param="n")
        return _sampling(self, max_tokens)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    model: ModelName
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=10_000)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    response_format: ResponseFormat | None = None

    def to_generation(self) -> GenerationRequest:
        """The validated generation, or ApiError naming what cannot be served."""
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        if self.response_format and self.response_format.type != "text":
            raise ApiError(400, f"response_format '{self.response_format.type}' is not supported; only 'text'",
                           param="response_format")
        messages = tuple(_message(i, m) for i, m in enumerate(self.messages))
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return GenerationRequest(model=self.model, kind="chat", messages=messages, **self._common(limit))


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    model: ModelName
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = ""
    max_tokens: MaxTokens | None = 16
    """OpenAI's default for completions is 16 tokens."""
    echo: bool = False
    suffix: str | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None

    def to_generation(self) -> GenerationRequest:
        """The validated generation, or ApiError naming what cannot be served."""
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        if self.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise ApiError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        prompt = self.prompt[0] if isinstance(self.prompt, list) else self.prompt
        return GenerationRequest(model=self.model, kind="completion", prompt=prompt, **self._common(self.max_tokens))


class EmbeddingRequest(_Body):
    """POST /v1/embeddings."""

    model: ModelName
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    def inputs(self) -> list[str]:
        """The texts to embed."""
        return [self.input] if isinstance(self.input, str) else list(self.input)


# --- Ollama -------------------------------------------------------------------------------------------


class OllamaOptions(_Body):
    """The Ollama ``options`` Hearth honours; others (num_ctx, num_gpu, ...) are ignored."""

    temperature: Temperature | None = None
    num_predict: Annotated[int, Field(ge=-2, le=MAX_TOKENS_LIMIT)] | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    top_p: Unit | None = None
    top_k: TopK | None = None
    min_p: Unit | None = None
    repeat_penalty: Penalty | None = None

    def common(self) -> dict[str, Any]:
        """Sampling for a GenerationRequest; num_predict < 0 means no limit (as in Ollama)."""
        limit = self.num_predict if self.num_predict is not None and self.num_predict > 0 else None
        if self.num_predict == 0:
            raise ApiError(400, "options.num_predict must not be 0", param="options.num_predict")
        return _sampling(self, limit)


class OllamaMessage(_Body):
    """One Ollama chat message."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""


class OllamaChatRequest(_Body):
    """POST /api/chat."""

    model: ModelName
    messages: Annotated[list[OllamaMessage], Field(min_length=1, max_length=10_000)]
    stream: bool = True
    options: OllamaOptions | None = None
    keep_alive: str | int | None = None

    def to_generation(self) -> GenerationRequest:
        """The validated generation."""
        opts = (self.options or OllamaOptions()).common()
        messages = tuple({"role": m.role, "content": m.content} for m in self.messages)
        return GenerationRequest(model=ollama_model(self.model), kind="chat", messages=messages, **opts)


class OllamaGenerateRequest(_Body):
    """POST /api/generate: the prompt is sent as it is (like Ollama's raw mode); ``system`` goes first."""

    model: ModelName
    prompt: str = ""
    system: str | None = None
    stream: bool = True
    options: OllamaOptions | None = None
    keep_alive: str | int | None = None

    def to_generation(self) -> GenerationRequest:
        """The validated generation."""
        opts = (self.options or OllamaOptions()).common()
        prompt = f"{self.system}\n\n{self.prompt}" if self.system else self.prompt
        return GenerationRequest(model=ollama_model(self.model), kind="completion", prompt=prompt, **opts)


def ollama_model(name: str) -> str:
    """Ollama clients say 'name:latest' for what Hearth calls 'name'."""
    return name.removesuffix(":latest")


def _sampling(body: Any, max_tokens: int | None) -> dict[str, Any]:
    """GenerationRequest sampling fields from an OpenAI body or Ollama options (same field names)."""
    return {
        "max_tokens": max_tokens,
        "temperature": _pick(body.temperature, "temperature"),
        "top_p": _pick(body.top_p, "top_p"),
        "top_k": _pick(body.top_k, "top_k"),
        "min_p": _pick(body.min_p, "min_p"),
        "repeat_penalty": _pick(body.repeat_penalty, "repeat_penalty"),
        "seed": None if body.seed is None else body.seed % (1 << 32),
        "stop": _stops(body.stop),
    }


def _pick(value: Any, name: str) -> Any:
    return DEFAULTS[name] if value is None else value


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    return tuple(s for s in items if s)


def _message(index: int, m: ChatMessage) -> dict[str, Any]:
    if isinstance(m.content, list):
        texts = []
        for part in m.content:
            if part.type != "text":
                raise ApiError(400, f"message part type '{part.type}' is not supported; only text",
                               param=f"messages.{index}.content")
            texts.append(part.text or "")
        content = "".join(texts)
    else:
        content = m.content or ""
    # Chat templates know system/user/assistant; OpenAI's newer 'developer' role is a system message.
    role = "system" if m.role == "developer" else m.role
    return {"role": role, "content": content}
