"""The API against a fake router: wire formats exactly, every bad input a 4xx with a message, 429, /health, /metrics."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import httpx
import pytest

from hearth.api.app import create_app
from hearth.api.testing import FakeRouter, FakeRuntime
from hearth.serving.types import UpstreamError

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def runtime(tmp_path: Path) -> FakeRuntime:
    return FakeRuntime(tmp_path)


@pytest.fixture
async def client(runtime: FakeRuntime):
    app = create_app(runtime)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node") as c:
        yield c


def sse_events(text: str) -> list[str]:
    """The data payloads of an SSE body, checking the framing on the way."""
    assert text.endswith("\n\n")
    blocks = text[:-2].split("\n\n")
    assert all(b.startswith("data: ") for b in blocks), blocks
    return [b[len("data: "):] for b in blocks]


# --- OpenAI wire format ---------------------------------------------------------------------------


async def test_chat_completion_whole(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "fake" and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello, world", "refusal": None},
                                "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


async def test_chat_completion_stream(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["created"] for c in chunks} == {chunks[0]["created"]}
    assert all("usage" not in c for c in chunks)
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello, world!"
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]


async def test_stream_include_usage(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions",
                          json={**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


async def test_completion_whole_and_stream(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"model": "fake", "prompt": "Once", "max_tokens": 2})
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"text": "Hello,", "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert body["usage"]["completion_tokens"] == 2

    r = await client.post("/v1/completions", json={"model": "fake", "prompt": ["Once"], "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello, world!"
    assert chunks[-1]["choices"][0] == {"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}


async def test_sampling_reaches_the_router(client: httpx.AsyncClient, runtime: FakeRuntime) -> None:
    await client.post("/v1/chat/completions", json={**CHAT, "temperature": 0.1, "top_p": 0.5, "seed": 7,
                                                     "stop": "x", "max_completion_tokens": 9})
    await client.post("/v1/completions", json={"model": "fake", "prompt": "p", "stop": ["a", "b"]})
    await client.post("/v1/chat/completions", json=CHAT)
    first, second, third = (rec.request for rec in runtime.router.records)
    assert (first.temperature, first.top_p, first.seed, first.stop, first.max_tokens) == (0.1, 0.5, 7, ("x",), 9)
    assert second.stop == ("a", "b") and second.max_tokens == 16 and second.kind == "completion"
    # The documented defaults: no repeat penalty (llama_cpp.server would use 1.1), no length limit for chat.
    assert (third.temperature, third.top_p, third.top_k, third.repeat_penalty, third.max_tokens) == (0.8, 0.95, 40, 1.0, None)


async def test_stop_ends_the_answer(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "stop": ["world"]})
    assert r.json()["choices"][0]["message"]["content"] == "Hello,"


async def test_models_and_embeddings(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.json()["object"] == "list"
    assert [m["id"] for m in r.json()["data"]] == ["fake", "fake-embed"]
    assert set(r.json()["data"][0]) == {"id", "object", "created", "owned_by"}
    assert (await client.get("/v1/models/fake")).json()["id"] == "fake"
    assert (await client.get("/v1/models/nope")).status_code == 404

    r = await client.post("/v1/embeddings", json={"model": "fake-embed", "input": ["ab", "abc"]})
    body = r.json()
    assert body["object"] == "list" and body["model"] == "fake-embed"
    assert body["data"] == [{"object": "embedding", "index": 0, "embedding": [2.0, 0.5, -1.0]},
                            {"object": "embedding", "index": 1, "embedding": [3.0, 0.5, -1.0]}]
    r = await client.post("/v1/embeddings", json={"model": "fake-embed", "input": "ab", "encoding_format": "base64"})
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert struct.unpack("<3f", raw) == (2.0, 0.5, -1.0)


# --- Ollama --------------------------------------------------------------------------------------


async def test_ollama_chat_stream(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/chat", json={"model": "fake:latest", "messages": [{"role": "user", "content": "hi"}],
                                             "options": {"num_predict": 2, "seed": 1}})
    assert r.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert [x["message"] for x in lines[:-1]] == [{"role": "assistant", "content": "Hello"},
                                                  {"role": "assistant", "content": ","}]
    assert all(x["done"] is False and x["model"] == "fake:latest" and x["created_at"].endswith("Z") for x in lines[:-1])
    last = lines[-1]
    assert last["done"] is True and last["done_reason"] == "length"
    assert last["eval_count"] == 2 and last["prompt_eval_count"] == 5
    assert all(isinstance(last[k], int) for k in ("total_duration", "prompt_eval_duration", "eval_duration"))


async def test_ollama_generate_whole(client: httpx.AsyncClient, runtime: FakeRuntime) -> None:
    r = await client.post("/api/generate", json={"model": "fake", "prompt": "Why", "system": "Be brief", "stream": False,
                                                 "options": {"temperature": 0, "top_k": 5, "stop": ["!"]}})
    body = r.json()
    assert body["response"] == "Hello, world" and body["done"] is True and body["done_reason"] == "stop"
    req = runtime.router.records[-1].request
    assert (req.prompt, req.temperature, req.top_k, req.stop) == ("Be brief\n\nWhy", 0, 5, ("!",))


async def test_ollama_listing(client: httpx.AsyncClient) -> None:
    tags = (await client.get("/api/tags")).json()["models"]
    assert tags[0]["name"] == "fake:latest" and tags[0]["details"]["format"] == "gguf"
    ps = (await client.get("/api/ps")).json()["models"]
    assert {m["name"] for m in ps} == {"fake:latest", "fake-embed:latest"}
    assert (await client.get("/api/version")).json()["version"].count(".") == 2


# --- errors ----------------------------------------------------------------------------------------

BAD = [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON", None),
    ("/v1/chat/completions", b"[1, 2]", 400, "", None),
    ("/v1/chat/completions", b"", 400, "", None),
    ("/v1/chat/completions", {"model": "fake"}, 400, "'messages' is required", "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages", "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "role", "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": -5}, 400, "greater than or equal to 1", "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "many"}, 400, "integer", "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "temperature": 9}, 400, "temperature", "temperature"),
    ("/v1/chat/completions", {**CHAT, "n": 2}, 400, "n > 1 is not supported", "n"),
    ("/v1/chat/completions", {**CHAT, "model": 42}, 400, "model", "model"),
    ("/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "model 'nope' is not served", "model"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}, 400,
     "longer than the model's context", None),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, 400, "response_format", "response_format.type"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, 400, "needs json_schema.schema",
     "response_format"),
    ("/v1/chat/completions", {**CHAT, "audio": {"voice": "alloy"}}, 400, "not supported", "audio"),
    ("/v1/chat/completions", {**CHAT, "bogus_field": 1}, 400, "bogus_field", "bogus_field"),

    ("/v1/completions", {"model": "fake", "prompt": "p", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"model": "fake", "prompt": ["a", "b"]}, 400, "prompt", "prompt"),
    ("/v1/completions", {"model": "fake", "prompt": "p", "stream": "sometimes"}, 400, "stream", "stream"),
    ("/v1/embeddings", {"model": "fake", "input": "x"}, 400, "cannot make embeddings", "model"),
    ("/v1/embeddings", {"model": "fake-embed", "input": [1, 2]}, 400, "input", "input"),
]


@pytest.mark.parametrize(("path", "body", "status", "message", "param"), BAD)
async def test_bad_input_is_4xx_with_message(client: httpx.AsyncClient, path: str, body: object, status: int,
                                             message: str, param: str | None) -> None:
    if isinstance(body, bytes):
        r = await client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = await client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert message in err["message"] and err["message"]
    if param:
        assert err["param"] == param
    # ... and the agent still serves.
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_ollama_errors_are_ollama_shaped(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/chat", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "nope" in r.json()["error"]
    one = [{"role": "user", "content": "x"}]
    r = await client.post("/api/chat", json={"model": "fake", "messages": one, "options": {"num_gpu": 1}})
    assert r.status_code == 400 and "options.num_gpu" in r.json()["error"] and "profile" in r.json()["error"]
    r = await client.post("/api/chat", json={"model": "fake", "messages": one, "keep_alive": 0})
    assert r.status_code == 400 and "keep_alive" in r.json()["error"]
    r = await client.post("/api/chat", json={"model": "fake", "messages": one, "bogus": 1})
    assert r.status_code == 400 and "bogus" in r.json()["error"]
    r = await client.post("/api/generate", json={"model": "fake", "options": {"num_predict": "lots"}})
    assert r.status_code == 400 and "options.num_predict" in r.json()["error"]


async def test_body_is_json_whatever_the_content_type(client: httpx.AsyncClient) -> None:
    # curl -d '{...}' sends application/x-www-form-urlencoded; Ollama's own examples do just that.
    r = await client.post("/api/generate", content=json.dumps({"model": "fake", "prompt": "p", "stream": False}),
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["response"] == "Hello, world!"
    r = await client.post("/v1/chat/completions", content=json.dumps(CHAT), headers={"content-type": "text/plain"})
    assert r.status_code == 200


async def test_unknown_endpoint_and_method(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/nothing")
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]
    r = await client.get("/v1/chat/completions")
    assert r.status_code == 405 and "GET is not allowed" in r.json()["error"]["message"]


async def test_oversized_body_is_413(tmp_path: Path) -> None:
    runtime = FakeRuntime(tmp_path, config=FakeRuntime(tmp_path).config.replace(**{"api.max_body_bytes": 2048}))
    app = create_app(runtime)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node") as c:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 4096}]}
        r = await c.post("/v1/chat/completions", json=big)
        assert r.status_code == 413 and "larger than 2048 bytes" in r.json()["error"]["message"]

        async def chunks():  # no Content-Length: the limit holds while reading
            for _ in range(8):
                yield b"x" * 1024

        r = await c.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert runtime.router.records and len(runtime.router.records) == 1


async def test_queue_full_is_429_with_retry_after(client: httpx.AsyncClient, runtime: FakeRuntime) -> None:
    runtime.router.queue_full = True
    for path, body in [("/v1/chat/completions", {**CHAT, "stream": True}), ("/api/chat", {**CHAT})]:
        r = await client.post(path, json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
        assert "busy" in r.text


async def test_upstream_failures(client: httpx.AsyncClient, runtime: FakeRuntime) -> None:
    router: FakeRouter = runtime.router
    router.fail_before = UpstreamError("no worker can take it", status=503, retry_after=1)
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    router.fail_before = None
    router.fail_after = 2
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = sse_events(r.text)
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]["message"] == "the model worker died"
    r = await client.post("/api/chat", json=CHAT)
    assert json.loads(r.text.splitlines()[-1]) == {"error": "the model worker died"}
    r = await client.post("/v1/completions", json={"model": "fake", "prompt": "p"})
    assert r.status_code == 503 and "worker died" in r.json()["error"]["message"]


# --- node endpoints ------------------------------------------------------------------------------


async def test_health_follows_the_runtime(client: httpx.AsyncClient, runtime: FakeRuntime) -> None:
    runtime.status = "loading"
    r = await client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    runtime.status = "ready"
    r = await client.get("/health")
    assert r.status_code == 200 and r.json()["models"]["fake"]["loaded"] is True


async def test_metrics_counts_requests_and_tokens(client: httpx.AsyncClient) -> None:
    await client.post("/v1/chat/completions", json=CHAT)
    await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    r = await client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'hearth_api_requests_total{endpoint="/v1/chat/completions",status="200"} 1' in text
    assert 'hearth_api_requests_total{endpoint="/v1/chat/completions",status="404"} 1' in text
    assert 'hearth_api_generated_tokens_total{model="fake"} 4' in text
    assert 'hearth_api_time_to_first_token_seconds_count{model="fake"} 1' in text
    assert "hearth_queue_depth 0.0" in text


async def test_ollama_show_and_pull_name_the_model(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/show", json={})
    assert r.status_code == 400 and "'model' is required" in r.json()["error"]
    r = await client.post("/api/show", json={"name": "nope:latest"})
    assert r.status_code == 404 and "nope" in r.json()["error"]
    r = await client.post("/api/pull", json={"model": "x", "insecure": True})
    assert r.status_code == 400 and "insecure" in r.json()["error"]
    r = await client.post("/api/show", json={"model": "fake", "verbose": True})
    assert r.status_code == 400 and "verbose" in r.json()["error"]
    r = await client.post("/api/embed", json={"model": "fake", "input": "x", "keep_alive": 0})
    assert r.status_code == 400 and "keep_alive" in r.json()["error"]


async def test_thinking_fields_reach_the_router_or_are_refused(client: httpx.AsyncClient, runtime: FakeRuntime) -> None:
    """reasoning_effort and Ollama's think switch thinking; an assistant's earlier thoughts go back to the
    template; think on /api/generate (a raw prompt, no template to think in) is a 400 naming it."""
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "reasoning_content": "Hm"},
               {"role": "user", "content": "Again"}]
    r = await client.post("/v1/chat/completions", json={"model": "fake", "messages": history, "reasoning_effort": "none"})
    assert r.status_code == 200, r.text
    req = runtime.router.records[-1].request
    assert req.think is False and req.messages[1]["reasoning_content"] == "Hm"
    await client.post("/v1/chat/completions", json={"model": "fake", "messages": history, "reasoning_effort": "high"})
    assert runtime.router.records[-1].request.think is True
    await client.post("/api/chat", json={"model": "fake", "stream": False, "think": True, "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "thinking": "Hm"}]})
    req = runtime.router.records[-1].request
    assert req.think is True and req.messages[1]["reasoning_content"] == "Hm"
    r = await client.post("/api/generate", json={"model": "fake", "prompt": "Why", "think": True, "stream": False})
    assert r.status_code == 400 and "think" in r.json()["error"], r.text
    r = await client.post("/api/generate", json={"model": "fake", "prompt": "Why", "think": False, "stream": False})
    assert r.status_code == 200, r.text
