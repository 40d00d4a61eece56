"""The bytes on the wire: OpenAI SSE chunks, OpenAI JSON answers and Ollama NDJSON lines.

Streaming formats are built once per request (id, created, model never change), so each token costs one
``json.dumps`` of its text and two concatenations: the API's per-token overhead stays a few microseconds.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from .. import __version__
from ..serving.types import TokenChunk

FINGERPRINT = f"hearth-{__version__}"
DONE = b"data: [DONE]\n\n"
_dumps = json.dumps


def new_id(prefix: str) -> str:
    """An OpenAI-style object id such as chatcmpl-<24 hex>."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict[str, int]:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(reason: str) -> str:
    """'cancelled' only reaches a client that is gone; anything else OpenAI does not know is 'stop'."""
    return reason if reason in ("stop", "length", "tool_calls") else "stop"


class OpenAIStream:
    """SSE chunks of one streamed chat or text completion, with the constant parts pre-encoded."""

    def __init__(self, kind: str, model: str, include_usage: bool) -> None:
        self.chat = kind == "chat"
        self.id = new_id("chatcmpl" if self.chat else "cmpl")
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        head = (f'data: {{"id":"{self.id}","object":"{obj}","created":{self.created},'
                f'"model":{_dumps(model)},"system_fingerprint":"{FINGERPRINT}","choices":[')
        tail_usage = ',"usage":null' if include_usage else ""
        self._head = head
        if self.chat:
            self._prefix = (head + '{"index":0,"delta":{"content":').encode()
            self._suffix = ('},"logprobs":null,"finish_reason":null}]' + tail_usage + "}\n\n").encode()
        else:
            self._prefix = (head + '{"text":').encode()
            self._suffix = (',"index":0,"logprobs":null,"finish_reason":null}]' + tail_usage + "}\n\n").encode()
        self._tail_usage = tail_usage

    def first(self) -> bytes:
        """The chunk that opens a chat stream (the assistant role); empty for text completions."""
        if not self.chat:
            return b""
        return (self._head + '{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
                '"finish_reason":null}]' + self._tail_usage + "}\n\n").encode()

    def token(self, text: str) -> bytes:
        """One chunk carrying *text*: the hot path."""
        return self._prefix + _dumps(text).encode() + self._suffix

    def delta(self, chunk: TokenChunk) -> bytes:
        """A chunk with more than text: thoughts, tool-call deltas, logprobs (the rare path)."""
        if not self.chat:
            logprobs = chunk.logprobs[0].get("completion") if chunk.logprobs else None
            body = f'{{"text":{_dumps(chunk.text)},"index":0,"logprobs":{_dumps(logprobs)},"finish_reason":null}}]'
            return (self._head + body + self._tail_usage + "}\n\n").encode()
        delta: dict[str, Any] = {}
        if chunk.text:
            delta["content"] = chunk.text
        if chunk.reasoning:
            delta["reasoning_content"] = chunk.reasoning
        if chunk.tool_calls:
            delta["tool_calls"] = [_tool_call_delta(c) for c in chunk.tool_calls]
        logprobs = {"content": list(chunk.logprobs)} if chunk.logprobs else None
        body = f'{{"index":0,"delta":{_dumps(delta)},"logprobs":{_dumps(logprobs)},"finish_reason":null}}]'
        return (self._head + body + self._tail_usage + "}\n\n").encode()

    def end(self, reason: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The finishing chunk, the usage chunk when asked for, and [DONE]."""
        reason = finish_reason(reason)
        if self.chat:
            last = f'{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"{reason}"}}]'
        else:
            last = f'{{"text":"","index":0,"logprobs":null,"finish_reason":"{reason}"}}]'
        out = self._head + last + self._tail_usage + "}\n\n"
        if self.include_usage:
            out += self._head + '],"usage":' + _dumps(usage(prompt_tokens, completion_tokens)) + "}\n\n"
        return out.encode() + DONE

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        """An error after the stream began: the openai client raises it as an APIError."""
        return b"data: " + _dumps(body).encode() + b"\n\n"


def _tool_call_delta(call: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"index": int(call.get("index", 0))}
    if call.get("id"):
        out["id"] = call["id"]
        out["type"] = "function"
    fn = call.get("function") or {}
    out["function"] = {k: fn[k] for k in ("name", "arguments") if fn.get(k) is not None}
    return out


def chat_completion(model: str, answer: Any) -> dict[str, Any]:
    """A whole (non-streamed) chat completion from an api.generation.Answer."""
    fin = answer.finished
    message: dict[str, Any] = {"role": "assistant", "content": answer.text if answer.text or not answer.calls else None,
                               "refusal": None}
    if answer.reasoning:
        message["reasoning_content"] = answer.reasoning
    if answer.calls:
        message["tool_calls"] = answer.tool_calls
    return {
        "id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"index": 0, "message": message,
                     "logprobs": {"content": answer.logprobs} if answer.logprobs else None,
                     "finish_reason": finish_reason(fin.finish_reason)}],
        "usage": usage(fin.prompt_tokens, fin.completion_tokens),
    }


def text_completion(model: str, answer: Any) -> dict[str, Any]:
    """A whole (non-streamed) text completion from an api.generation.Answer."""
    fin = answer.finished
    logprobs = None
    if answer.logprobs:
        merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for part in answer.logprobs:
            for key in merged:
                merged[key].extend((part.get("completion") or {}).get(key) or [])
        logprobs = merged
    return {
        "id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"text": answer.text, "index": 0, "logprobs": logprobs,
                     "finish_reason": finish_reason(fin.finish_reason)}],
        "usage": usage(fin.prompt_tokens, fin.completion_tokens),
    }


# --- Ollama -------------------------------------------------------------------------------------------


def now_rfc3339() -> str:
    """Ollama's created_at: RFC 3339 UTC with nanosecond-style precision."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class OllamaStream:
    """NDJSON lines of one streamed /api/chat or /api/generate answer."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self._head = f'{{"model":{_dumps(model)},"created_at":"'
        self._mid = '","message":{"role":"assistant","content":' if chat else '","response":'
        self._tail = '},"done":false}\n' if chat else ',"done":false}\n'

    def token(self, text: str) -> bytes:
        """One line carrying *text*."""
        return (self._head + now_rfc3339() + self._mid + _dumps(text) + self._tail).encode()

    def token_with_logprobs(self, text: str, logprobs: list[dict[str, Any]]) -> bytes:
        """One line carrying *text* and its tokens' logprobs (Ollama's form: token, logprob, top_logprobs)."""
        lp = _dumps([ollama_logprob(x) for x in logprobs])
        if self.chat:
            return (self._head + now_rfc3339() + self._mid + _dumps(text) + '},"logprobs":' + lp
                    + ',"done":false}\n').encode()
        return (self._head + now_rfc3339() + self._mid + _dumps(text) + ',"logprobs":' + lp + ',"done":false}\n').encode()

    def thinking(self, text: str) -> bytes:
        """One line carrying a piece of the model's thoughts (chat with think)."""
        if not self.chat:
            return (self._head + now_rfc3339() + '","response":"","thinking":' + _dumps(text) + ',"done":false}\n').encode()
        return (self._head + now_rfc3339() + '","message":{"role":"assistant","content":"","thinking":' + _dumps(text)
                + '},"done":false}\n').encode()

    def tool_calls(self, calls: list[dict[str, Any]]) -> bytes:
        """One line carrying the answer's complete tool calls (Ollama streams them whole)."""
        return (self._head + now_rfc3339() + '","message":{"role":"assistant","content":"","tool_calls":'
                + _dumps(calls) + '},"done":false}\n').encode()

    def end(self, reason: str, timings: dict[str, int]) -> bytes:
        """The final line with done_reason and Ollama's counts and durations (nanoseconds)."""
        return (_dumps(ollama_final(self.chat, self.model, "", reason, timings), separators=(",", ":")) + "\n").encode()


def ollama_logprob(x: dict[str, Any]) -> dict[str, Any]:
    """One OpenAI-style token logprob as Ollama's."""
    return {"token": x.get("token", ""), "logprob": x.get("logprob", 0.0),
            "top_logprobs": [{"token": t.get("token", ""), "logprob": t.get("logprob", 0.0)}
                             for t in x.get("top_logprobs") or ()]}


def ollama_final(chat: bool, model: str, text: str, reason: str, timings: dict[str, int], thinking: str = "",
                 tool_calls: list[dict[str, Any]] | None = None,
                 logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The final (or only, with stream:false) Ollama object."""
    out: dict[str, Any] = {"model": model, "created_at": now_rfc3339()}
    if chat:
        out["message"] = {"role": "assistant", "content": text}
        if thinking:
            out["message"]["thinking"] = thinking
        if tool_calls:
            out["message"]["tool_calls"] = tool_calls
    else:
        out["response"] = text
        if thinking:
            out["thinking"] = thinking
    if logprobs:
        out["logprobs"] = [ollama_logprob(x) for x in logprobs]
    out["done"] = True
    out["done_reason"] = "stop" if reason == "tool_calls" else finish_reason(reason)
    out.update(timings)
    return out
