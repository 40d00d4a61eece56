"""Running one generation for an HTTP request: open it, wait for its first event, stream or collect the rest.

The first event is awaited before any response header goes out, so a refusal (404 unknown model, 429
queue full, 400 prompt too long) is a proper HTTP status, not an error hidden in a 200 stream. While
waiting (queued, or reading a long prompt) a watcher notices a client that hangs up and cancels the wait;
once streaming, Starlette cancels the stream when the client leaves. Either way the router's iterator is
closed, which is how the generation upstream is told to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.types import Receive

from ..serving.types import Event, Finished, GenerationRequest, Router, TokenChunk, UpstreamError
from .errors import ApiError
from .metrics import ApiMetrics

log = logging.getLogger(__name__)



class ClientGone(Exception):
    """The client hung up before the answer began."""


@contextlib.asynccontextmanager
async def cancel_on_disconnect(receive: Receive) -> AsyncIterator[None]:
    """Cancel the body of the ``async with`` when the client disconnects; raises ClientGone then."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = True
                task.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        yield
    except asyncio.CancelledError:
        if gone:
            task.uncancel()
            raise ClientGone() from None
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher


async def close_quietly(events: AsyncIterator[Event]) -> None:
    """Close the router's iterator even from a cancelled scope: that is what stops the generation."""
    aclose = getattr(events, "aclose", None)
    if aclose is None:
        return
    with anyio.move_on_after(5, shield=True):
        try:
            await aclose()
        except Exception:  # the generation is being abandoned; its failure is no news to anyone
            log.debug("closing a generation failed", exc_info=True)


@dataclass
class Answer:
    """A whole answer gathered from its chunks: text, thoughts, complete tool calls, logprobs."""

    parts: list[str] = field(default_factory=list)
    thoughts: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finished: Finished = field(default_factory=lambda: Finished("stop", 0, 0))

    def add(self, chunk: TokenChunk) -> None:
        """Add one chunk; tool-call deltas are merged by index (the arguments arrive in pieces)."""
        if chunk.text:
            self.parts.append(chunk.text)
        if chunk.reasoning:
            self.thoughts.append(chunk.reasoning)
        self.logprobs.extend(chunk.logprobs)
        for delta in chunk.tool_calls:
            merge_tool_call(self.calls, delta)

    @property
    def text(self) -> str:
        """The answer's text."""
        return "".join(self.parts)

    @property
    def reasoning(self) -> str:
        """The model's thoughts (thinking models), or ''."""
        return "".join(self.thoughts)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """Complete tool calls in OpenAI's form (arguments as a JSON string), in order."""
        return [self.calls[i] for i in sorted(self.calls)]


def merge_tool_call(calls: dict[int, dict[str, Any]], delta: dict[str, Any]) -> None:
    """Fold one streamed tool-call delta into *calls* (by its index)."""
    index = int(delta.get("index", len(calls)))
    call = calls.setdefault(index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
    if delta.get("id"):
        call["id"] = delta["id"]
    fn = delta.get("function") or {}
    if fn.get("name"):
        call["function"]["name"] += fn["name"]
    if fn.get("arguments"):
        call["function"]["arguments"] += fn["arguments"]


@dataclass
class Generation:
    """An opened generation: its first event and the iterator for the rest."""

    request: GenerationRequest
    first: Event
    events: AsyncIterator[Event]
    started: float
    metrics: ApiMetrics

    async def rest(self) -> AsyncIterator[Event]:
        """Every event, the first included; the iterator is closed however this ends."""
        done = False
        try:
            if isinstance(self.first, Finished):
                done = True
                self.metrics.finished(self.request.model, self.first.prompt_tokens, self.first.completion_tokens)
            yield self.first
            if done:
                return
            async for event in self.events:
                if type(event) is not TokenChunk and isinstance(event, Finished):
                    done = True
                    self.metrics.finished(self.request.model, event.prompt_tokens, event.completion_tokens)
                yield event
                if done:
                    return
            raise UpstreamError("the model stopped without finishing its answer", before_first_token=False)
        except (asyncio.CancelledError, GeneratorExit):
            if not done:
                self.metrics.disconnects += 1
            raise
        finally:
            await close_quietly(self.events)

    async def collect(self, receive: Receive) -> Answer:
        """The whole answer (non-streaming); a client that leaves meanwhile cancels it."""
        answer = Answer()
        stream = self.rest()
        try:
            async with cancel_on_disconnect(receive):
                async for event in stream:
                    if isinstance(event, TokenChunk):
                        answer.add(event)
                    elif isinstance(event, Finished):
                        answer.finished = event
                        return answer
        except UpstreamError as e:
            raise ApiError.from_upstream(e) from None
        finally:
            await close_quietly(stream)
        raise ApiError(503, "the model stopped without finishing its answer")


async def open_generation(router: Router, request: GenerationRequest, receive: Receive,
                          metrics: ApiMetrics) -> Generation:
    """Start *request* and wait for its first event; refusals become ApiError, a hang-up ClientGone."""
    started = time.perf_counter()
    require_generation(router, request.model)
    events = router.generate(request)
    try:
        async with cancel_on_disconnect(receive):
            first = await events.__anext__()
    except UpstreamError as e:
        await close_quietly(events)
        raise ApiError.from_upstream(e) from None
    except StopAsyncIteration:
        raise ApiError(503, "the model ended the answer before it began") from None
    except ClientGone:
        metrics.disconnects += 1
        await close_quietly(events)
        raise
    except BaseException:
        await close_quietly(events)
        raise
    metrics.first_token(request.model, time.perf_counter() - started)
    return Generation(request, first, events, started, metrics)


def require_generation(router: Router, model: str) -> None:
    """A 400 for a chat or completion sent to an embedding model (its server only embeds)."""
    for info in router.models():
        if info.name == model and info.can_embed:
            raise ApiError(400, f"model '{model}' is an embedding model: it makes embeddings (/v1/embeddings, "
                           "/api/embed), not chats or completions", param="model")


def require_tools(router: Router, model: str) -> None:
    """A 400 for tools sent to a model whose template cannot call them (never silence)."""
    info = next((m for m in router.models() if m.name == model), None)
    # Only a loaded model's template is known; one still loading is asked again once it serves.
    if info is not None and info.loaded and info.context_length and not info.tools:
        raise ApiError(400, f"model '{model}' cannot call tools (its chat template has no tool support)",
                       param="tools")
