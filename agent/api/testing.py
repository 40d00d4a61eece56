"""A fake router and runtime for testing the API (and anything that talks to it) without a model.

``FakeRouter`` answers with scripted words, can refuse (unknown model, full queue, failures before or
after the first token) and records every generation's fate, so tests can prove that a client hanging up
stops the generation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import Config
from ..serving.types import (
    Event,
    Finished,
    GenerationRequest,
    ModelInfo,
    ModelNotFound,
    QueueFull,
    TokenChunk,
    UpstreamError,
)


@dataclass
class Record:
    """What happened to one generation."""

    request: GenerationRequest
    tokens_sent: int = 0
    finished: bool = False
    cancelled: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class FakeRouter:
    """Generates ``words`` for model 'fake' (and 'fake-embed', which can embed)."""

    def __init__(self, words: tuple[str, ...] = ("Hello", ",", " world", "!"), delay: float = 0.0,
                 prompt_tokens: int = 5, context: int = 2048, any_model: bool = False) -> None:
        self.words = words
        self.delay = delay
        self.prompt_tokens = prompt_tokens
        self.context = context
        self.any_model = any_model
        """Serve any model name (fuzzing reaches the generation paths with strange names)."""
        self.records: list[Record] = []
        self.queue_full = False
        self.fail_before: UpstreamError | None = None
        self.fail_after: int | None = None
        self.hold_first: asyncio.Event | None = None
        """When set, generations wait on it before the first token (a queued or slow prompt)."""

    def models(self) -> list[ModelInfo]:
        """Two fake models."""
        return [ModelInfo("fake", context_length=self.context, size_bytes=1000, family="llama", quantization="Q4_K_M"),
                ModelInfo("fake-embed", context_length=512, can_embed=True)]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Scripted words; honours max_tokens and stop; records cancellation."""
        if request.model not in ("fake", "fake-embed") and not self.any_model:
            raise ModelNotFound(request.model)
        if self.queue_full:
            raise QueueFull(request.model, retry_after=2.5)
        if self.fail_before is not None:
            raise self.fail_before
        text = request.prompt + "".join(m.get("content", "") for m in request.messages)
        if len(text) > self.context:
            raise UpstreamError(f"the prompt is longer than the model's context ({self.context} tokens)",
                                status=400, hint="shorten the prompt or the conversation")
        rec = Record(request)
        self.records.append(rec)
        try:
            if self.hold_first is not None:
                await self.hold_first.wait()
            limit = request.max_tokens if request.max_tokens is not None else len(self.words)
            reason: Literal["stop", "length"] = "stop"
            for i, word in enumerate(self.words):
                if i >= limit:
                    reason = "length"
                    break
                if any(s in word for s in request.stop):
                    break
                if self.fail_after is not None and i >= self.fail_after:
                    raise UpstreamError("the model worker died", status=503, before_first_token=False)
                if self.delay:
                    await asyncio.sleep(self.delay)
                rec.tokens_sent += 1
                yield TokenChunk(word)
            rec.finished = True
            yield Finished(reason, self.prompt_tokens, rec.tokens_sent, served_by="local")
        except (asyncio.CancelledError, GeneratorExit):
            rec.cancelled = True
            raise
        finally:
            rec.closed.set()

    async def embed(self, model: str, inputs: list[str]) -> tuple[list[list[float]], int]:
        """Three-dimensional vectors from the text length."""
        if model != "fake-embed":
            raise UpstreamError(f"model '{model}' cannot make embeddings", status=400)
        return [[float(len(t)), 0.5, -1.0] for t in inputs], sum(len(t.split()) for t in inputs)


class FakeRuntime:
    """A Runtime around a FakeRouter, with a state dir for API keys."""

    def __init__(self, state_dir: Path, config: Config | None = None, router: FakeRouter | None = None) -> None:
        self.config = config or Config()
        self.router = router or FakeRouter()
        self.state_dir = Path(state_dir)
        self.extra_routers: list[Any] = []
        self.status = "ready"

    def health(self) -> dict[str, Any]:
        """Ready unless told otherwise."""
        return {"status": self.status, "models": {"fake": {"loaded": self.status == "ready"}}, "warnings": []}

    def metrics(self) -> dict[str, float]:
        """A queue depth gauge."""
        return {"queue_depth": 0.0}
