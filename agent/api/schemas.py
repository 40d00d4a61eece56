"""Request bodies of the OpenAI- and Ollama-style endpoints, and how each becomes a GenerationRequest.

The models describe the bodies in the OpenAPI document (schemathesis fuzzes from it) and validate them.
No field is silently ignored: every field a client may send is either honoured (passed to llama-server,
or used by Hearth itself) or refused with a 400 that names it; a field Hearth does not know at all is a
400 too (``extra="forbid"``). ``REFUSED`` lists the known fields Hearth refuses, with the reason; the test
tier walks the official clients' request types against these two sets.

Sampling defaults are explicit (``DEFAULTS``) and are llama.cpp's own, with one deliberate difference from
``llama_cpp.server``: ``repeat_penalty`` is 1.0 (no penalty), as in OpenAI's API.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..serving.types import GenerationRequest
from .errors import ApiError

log = logging.getLogger(__name__)

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
TopLogprobs = Annotated[int, Field(ge=0, le=20)]

REFUSED: dict[str, str] = {
    "audio": "audio output is not supported; Hearth answers in text",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported: a Hearth node never leaves the house",
    "functions": "the deprecated 'functions' field is not supported; send 'tools'",
    "function_call": "the deprecated 'function_call' field is not supported; send 'tool_choice'",
    "verbosity": "verbosity is not supported; ask for the length in the prompt",
    "prompt_cache_options": "prompt cache options are not supported; each slot caches its prompt by itself",
    "moderation": "moderation is not supported: the node runs no moderation model",
    "suffix": "suffix (fill-in-the-middle) is not supported",
    "best_of": "best_of > 1 is not supported: send one request per completion",
    "echo": "echo is not supported",
    "images": "images are not supported by the models Hearth serves",
    "raw": "raw mode is not supported: /api/generate sends the prompt as it is already",
    "context": "the deprecated 'context' token list is not supported; send the conversation to /api/chat",
    "template": "a per-request template is not supported; the model's own template is used",
}
"""Fields of the OpenAI and Ollama request types Hearth refuses (400 naming the field), and why."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _refuse(name: str, value: Any, *, allowed: Any = None) -> None:
    """Refuse *name* unless it is unset or one of the values that mean the default."""
    if value is None or value == allowed or (isinstance(allowed, tuple) and value in allowed):
        return
    raise ApiError(400, f"'{name}' is not supported: {REFUSED.get(name, 'Hearth cannot honour it')}", param=name)


class TextPart(_Body):
    """One part of a multi-part message; only text parts are understood."""

    type: str
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None


class FunctionCall(_Body):
    """A function call the assistant made (arguments as a JSON string, OpenAI's form)."""

    name: str
    arguments: str = ""


class ToolCall(_Body):
    """One tool call in an assistant message."""

    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    """One chat message: text, an assistant's tool calls, or a tool's result."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    """An assistant's earlier thoughts (llama.cpp's and DeepSeek's field), given back to the model's template."""
    audio: Any = None
    function_call: Any = None


class StreamOptions(_Body):
    """OpenAI's stream options."""

    include_usage: bool = False
    include_obfuscation: bool | None = None
    """Accepted: Hearth never pads chunks, so there is nothing to turn off."""


class JsonSchema(_Body):
    """response_format.json_schema: the schema the answer must match (enforced by a grammar)."""

    name: str = "answer"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Body):
    """text, json_object (any JSON object) or json_schema (an object matching the schema)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchema | None = None

    def for_server(self) -> dict[str, Any] | None:
        """llama-server's response_format, or None for plain text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise ApiError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        return {"type": "json_schema", "json_schema": {"name": self.json_schema.name,
                                                        "schema": self.json_schema.schema_, "strict": True}}


class FunctionDef(_Body):
    """A function the model may call."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    """One tool: a function."""

    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Body):
    """tool_choice's function name."""

    name: str


class NamedToolChoice(_Body):
    """tool_choice naming one function."""

    type: Literal["function"] = "function"
    function: NamedFunction


class _Sampling(_Body):
    temperature: Temperature | None = None
    top_p: Unit | None = None
    top_k: TopK | None = None
    min_p: Unit | None = None
    repeat_penalty: Penalty | None = None
    presence_penalty: OpenAIPenalty | None = None
    frequency_penalty: OpenAIPenalty | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    """Recorded in the agent's log with the request, to tell apart who asked."""

    def _common(self, max_tokens: int | None) -> dict[str, Any]:
        if self.n not in (None, 1):
            raise ApiError(400, "n > 1 is not supported: send one request per completion", param="n")
        if self.user:
            log.info("request for %s from user %r", getattr(self, "model", "?"), self.user)
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
    top_logprobs: TopLogprobs | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    """A thinking model thinks unless this is 'none' or 'minimal'."""
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None
    """Recorded in the agent's log, like user."""
    prompt_cache_key: Annotated[str, Field(max_length=256)] | None = None
    """Accepted: llama-server keeps each conversation's prompt cached in its slot by itself."""
    service_tier: Literal["auto", "default"] | None = None
    store: Literal[False] | None = None
    """Hearth stores no completions: only false is accepted."""
    metadata: Annotated[dict[str, str], Field(max_length=0)] | None = None
    """Only for stored completions, which Hearth does not keep: only {} is accepted."""
    modalities: list[Literal["text"]] | None = None
    prompt_cache_retention: Literal["in_memory"] | None = None
    """Accepted: each slot keeps its prompt cached in memory; '24h' (kept on disk) is refused."""
    prompt_cache_options: Any = None
    moderation: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    verbosity: Any = None

    def to_generation(self) -> GenerationRequest:
        """The validated generation, or ApiError naming what cannot be served."""
        for name in ("audio", "prediction", "web_search_options", "functions", "function_call", "verbosity",
                     "prompt_cache_options", "moderation"):
            _refuse(name, getattr(self, name))
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.safety_identifier:
            log.info("request for %s with safety identifier %r", self.model, self.safety_identifier)
        messages = tuple(_message(i, m) for i, m in enumerate(self.messages))
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        tools = tuple(t.model_dump(exclude_none=True) for t in self.tools or ())
        choice: Any = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in {t.function.name for t in self.tools or ()}:
                raise ApiError(400, f"tool_choice names '{choice.function.name}', which is not in tools",
                               param="tool_choice")
            choice = choice.model_dump()
        if choice is not None and not tools and choice != "none":
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        think = None if self.reasoning_effort is None else self.reasoning_effort not in ("none", "minimal")
        extra = {"logit_bias": _logit_bias(self.logit_bias)} if self.logit_bias else {}
        return GenerationRequest(
            model=self.model, kind="chat", messages=messages, tools=tools if choice != "none" else (),
            tool_choice=choice if choice != "none" else None, parallel_tool_calls=self.parallel_tool_calls,
            response_format=self.response_format.for_server() if self.response_format else None,
            logprobs=bool(self.logprobs), top_logprobs=self.top_logprobs, think=think, extra=extra,
            **self._common(limit))


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    model: ModelName
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = ""
    max_tokens: MaxTokens | None = 16
    """OpenAI's default for completions is 16 tokens."""
    echo: bool = False
    suffix: str | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None

    def to_generation(self) -> GenerationRequest:
        """The validated generation, or ApiError naming what cannot be served."""
        _refuse("echo", self.echo or None)
        _refuse("suffix", self.suffix or None)
        _refuse("best_of", self.best_of, allowed=1)
        prompt = self.prompt[0] if isinstance(self.prompt, list) else self.prompt
        extra = {"logit_bias": _logit_bias(self.logit_bias)} if self.logit_bias else {}
        return GenerationRequest(model=self.model, kind="completion", prompt=prompt, logprobs=bool(self.logprobs),
                                 top_logprobs=self.logprobs or None, extra=extra, **self._common(self.max_tokens))


class EmbeddingRequest(_Body):
    """POST /v1/embeddings."""

    model: ModelName
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    def inputs(self) -> list[str]:
        """The texts to embed (user is recorded in the agent's log, as for generations)."""
        if self.user:
            log.info("embeddings for %s from user %r", self.model, self.user)
        return [self.input] if isinstance(self.input, str) else list(self.input)


# --- Ollama -------------------------------------------------------------------------------------------

OLLAMA_LOAD_OPTIONS = ("numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
                       "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread")
"""Ollama options that decide how a model is loaded: Hearth's profile decides those (refused per request)."""


class OllamaOptions(_Body):
    """Ollama's ``options``: sampling is honoured; load-time options are refused (the profile decides them)."""

    temperature: Temperature | None = None
    num_predict: Annotated[int, Field(ge=-2, le=MAX_TOKENS_LIMIT)] | None = None
    num_ctx: Annotated[int, Field(ge=1, le=1 << 24)] | None = None
    """Honoured as a cap: the answer stops where prompt + answer reach num_ctx (or the slot's own context)."""
    num_keep: Annotated[int, Field(ge=-1)] | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    top_p: Unit | None = None
    top_k: TopK | None = None
    min_p: Unit | None = None
    typical_p: Unit | None = None
    repeat_last_n: Annotated[int, Field(ge=-1, le=1 << 20)] | None = None
    repeat_penalty: Penalty | None = None
    presence_penalty: OpenAIPenalty | None = None
    frequency_penalty: OpenAIPenalty | None = None
    mirostat: Literal[0, 1, 2] | None = None
    mirostat_tau: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] | None = None
    mirostat_eta: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] | None = None
    tfs_z: Any = None
    penalize_newline: Any = None
    numa: Any = None
    num_batch: Any = None
    num_gpu: Any = None
    main_gpu: Any = None
    low_vram: Any = None
    f16_kv: Any = None
    logits_all: Any = None
    vocab_only: Any = None
    use_mmap: Any = None
    use_mlock: Any = None
    embedding_only: Any = None
    num_thread: Any = None

    def common(self) -> dict[str, Any]:
        """Sampling for a GenerationRequest; num_predict < 0 means no limit (as in Ollama)."""
        for name in OLLAMA_LOAD_OPTIONS:
            if getattr(self, name) is not None:
                raise ApiError(400, f"options.{name} is not supported per request: the node's profile decides how "
                               "the model is loaded (set model.* in hearth.yaml)", param=f"options.{name}")
        for name in ("tfs_z", "penalize_newline"):
            if getattr(self, name) is not None:
                raise ApiError(400, f"options.{name} is not supported by llama.cpp any more", param=f"options.{name}")
        if self.num_predict == 0:
            raise ApiError(400, "options.num_predict must not be 0", param="options.num_predict")
        limit = self.num_predict if self.num_predict is not None and self.num_predict > 0 else None
        out = _sampling(self, limit)
        out["presence_penalty"] = self.presence_penalty
        out["frequency_penalty"] = self.frequency_penalty
        extra = {k: getattr(self, k) for k in ("typical_p", "repeat_last_n", "mirostat", "mirostat_tau",
                                                "mirostat_eta") if getattr(self, k) is not None}
        if self.num_keep is not None:
            extra["n_keep"] = self.num_keep
        if self.num_ctx is not None:
            extra["num_ctx"] = self.num_ctx
        out["extra"] = extra
        return out


class OllamaFunctionCall(_Body):
    """A tool call in an Ollama message: arguments as an object."""

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    index: int | None = None


class OllamaToolCall(_Body):
    """One tool call in an Ollama assistant message."""

    function: OllamaFunctionCall
    id: str | None = None


class OllamaMessage(_Body):
    """One Ollama chat message."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    thinking: str | None = None
    images: list[Any] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


KeepAlive = str | int | float | None


def _check_keep_alive(value: KeepAlive) -> None:
    """keep_alive asks a model to stay loaded at least that long, which Hearth always does; 0 (unload now) not."""
    if value in (0, "0", "0s", "0m"):
        raise ApiError(400, "keep_alive 0 (unload now) is not supported: a Hearth node keeps its models loaded",
                       param="keep_alive")


class _OllamaBase(_Body):
    model: ModelName
    stream: bool = True
    options: OllamaOptions | None = None
    keep_alive: KeepAlive = None
    """Accepted: Hearth keeps its models loaded (what keep_alive asks for at least); 0 (unload) is refused."""
    format: Literal["json", ""] | dict[str, Any] | None = None
    think: bool | Literal["low", "medium", "high"] | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None

    def _checked(self) -> dict[str, Any]:
        _check_keep_alive(self.keep_alive)
        opts = (self.options or OllamaOptions()).common()
        fmt: dict[str, Any] | None = None
        if self.format == "json":
            fmt = {"type": "json_object"}
        elif isinstance(self.format, dict):
            fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": self.format, "strict": True}}
        think = None if self.think is None else bool(self.think)
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return dict(opts, response_format=fmt, think=think, logprobs=bool(self.logprobs),
                    top_logprobs=self.top_logprobs or None)


class OllamaChatRequest(_OllamaBase):
    """POST /api/chat."""

    messages: Annotated[list[OllamaMessage], Field(min_length=1, max_length=10_000)]
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None

    def to_generation(self) -> GenerationRequest:
        """The validated generation."""
        common = self._checked()
        messages = tuple(_ollama_message(i, m) for i, m in enumerate(self.messages))
        tools = tuple(t.model_dump(exclude_none=True) for t in self.tools or ())
        return GenerationRequest(model=ollama_model(self.model), kind="chat", messages=messages, tools=tools, **common)


class OllamaGenerateRequest(_OllamaBase):
    """POST /api/generate: the prompt is sent as it is (like Ollama's raw mode); ``system`` goes first."""

    prompt: str = ""
    system: str | None = None
    suffix: str | None = None
    images: list[Any] | None = None
    raw: bool | None = None
    context: list[int] | None = None
    template: str | None = None

    def to_generation(self) -> GenerationRequest:
        """The validated generation."""
        _refuse("suffix", self.suffix or None)
        _refuse("images", self.images or None)
        _refuse("raw", self.raw, allowed=(True, False))
        _refuse("context", self.context or None)
        _refuse("template", self.template or None)
        common = self._checked()
        if common.pop("think"):
            # The prompt goes to the model as it is, with no template that could open a thinking block.
            raise ApiError(400, "think is not supported on /api/generate (the prompt is sent raw, with no "
                           "template); use /api/chat", param="think")
        prompt = f"{self.system}\n\n{self.prompt}" if self.system else self.prompt
        return GenerationRequest(model=ollama_model(self.model), kind="completion", prompt=prompt, **common)


class OllamaEmbedRequest(_Body):
    """POST /api/embed."""

    model: ModelName
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)]
    truncate: bool | None = None
    """Only false-or-unset is honoured as is; true (cut long inputs) is refused: inputs must fit."""
    options: OllamaOptions | None = None
    keep_alive: KeepAlive = None
    dimensions: Annotated[int, Field(ge=1)] | None = None

    def inputs(self) -> list[str]:
        """The texts to embed."""
        if self.truncate:
            raise ApiError(400, "truncate: true is not supported: shorten the input", param="truncate")
        _check_keep_alive(self.keep_alive)
        return [self.input] if isinstance(self.input, str) else list(self.input)


class OllamaShowRequest(_Body):
    """POST /api/show."""

    model: ModelName | None = None
    name: ModelName | None = None
    verbose: Literal[False] | None = None
    """Only the short form is served (no tokenizer tables): verbose true is a 400."""


class OllamaPullRequest(_Body):
    """POST /api/pull: fetch a catalogue model into the store and serve it."""

    model: ModelName | None = None
    name: ModelName | None = None
    insecure: bool | None = None
    stream: bool = True
    username: str | None = None
    password: str | None = None


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
        "presence_penalty": getattr(body, "presence_penalty", None),
        "frequency_penalty": getattr(body, "frequency_penalty", None),
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


def _logit_bias(bias: dict[str, float]) -> list[list[Any]]:
    out = []
    for token, value in bias.items():
        if not token.lstrip("-").isdigit():
            raise ApiError(400, f"logit_bias keys are token ids; '{token}' is not one", param="logit_bias")
        out.append([int(token), value])
    return out


def _message(index: int, m: ChatMessage) -> dict[str, Any]:
    if m.audio is not None or m.function_call is not None:
        name = "audio" if m.audio is not None else "function_call"
        raise ApiError(400, f"messages.{index}.{name} is not supported", param=f"messages.{index}.{name}")
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
    if m.role == "function":
        raise ApiError(400, "the deprecated 'function' role is not supported; send a 'tool' message",
                       param=f"messages.{index}.role")
    # Chat templates know system/user/assistant/tool; OpenAI's newer 'developer' role is a system message.
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
    if m.reasoning_content and m.role == "assistant":
        out["reasoning_content"] = m.reasoning_content
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.name and m.role != "tool":
        out["name"] = m.name
    return out


def _ollama_message(index: int, m: OllamaMessage) -> dict[str, Any]:
    if m.images:
        raise ApiError(400, REFUSED["images"], param=f"messages.{index}.images")
    out: dict[str, Any] = {"role": m.role, "content": m.content or ""}
    if m.thinking:
        out["reasoning_content"] = m.thinking
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id or f"call_{index}_{i}", "type": "function",
                              "function": {"name": c.function.name, "arguments": json.dumps(c.function.arguments)}}
                             for i, c in enumerate(m.tool_calls)]
    if m.role == "tool":
        if m.tool_call_id:
            out["tool_call_id"] = m.tool_call_id
        if m.tool_name:
            out["name"] = m.tool_name
    return out
