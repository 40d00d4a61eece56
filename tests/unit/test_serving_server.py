"""llama-server supervision and ServerUpstream against a fake llama-server (no model, milliseconds).

The fake speaks the parts of llama-server's HTTP API the agent uses, on the Unix socket it is given with
``--host``: /health (503 while "loading", then 200), /props, and OpenAI-style SSE from /v1/chat/completions
and /v1/completions, and it prints llama.cpp's load report on stderr. So these tests cover restart with
backoff, a server killed mid-stream, queue bounds, cancellation and the request mapping fast; the same
behaviours with the real llama-server and Gemma are in tests/integration/test_engine.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from hearth.serving.llamaserver import FLAGS, Backoff, ServerProcess, ServerSpec
from hearth.serving.local import ServerUpstream, server_body
from hearth.serving.types import Finished, GenerationRequest, QueueFull, TokenChunk, UpstreamError

pytestmark = pytest.mark.unit

FAKE_SERVER = textwrap.dedent(r'''
    import json, os, socketserver, sys, threading, time
    from http.server import BaseHTTPRequestHandler
    args = sys.argv[1:]
    sock = args[args.index("--host") + 1]
    slots = int(args[args.index("--parallel") + 1])
    log = os.environ.get("FAKE_LOG")
    if os.environ.get("FAKE_FAIL_LOAD"):
        print("llama_model_load: error loading model: tensor 'blk.0' data is not within the file bounds", file=sys.stderr)
        print("main: exiting due to model loading error", file=sys.stderr, flush=True)
        sys.exit(1)
    print("load_tensors: offloaded 3/3 layers to GPU", file=sys.stderr)
    print("load_tensors:      Vulkan0 model buffer size =    12.50 MiB", file=sys.stderr, flush=True)
    delay = float(os.environ.get("FAKE_DELAY", "0.01"))
    ready_at = time.monotonic() + float(os.environ.get("FAKE_LOAD_S", "0.1"))

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a): pass
        def _json(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code); self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
        def do_GET(self):
            if self.path == "/health":
                self._json(200 if time.monotonic() >= ready_at else 503, {"status": "ok"})
            elif self.path == "/props":
                self._json(200, {"total_slots": slots, "default_generation_settings": {"n_ctx": 128},
                                 "chat_template_caps": {"supports_tools": True}, "build_info": "fake"})
            else:
                self._json(404, {"error": {"message": "no such path"}})
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if log:
                open(log, "a").write(json.dumps({"path": self.path, "body": body}) + "\n")
            if "prompt" in body and body["prompt"] == "too long":
                return self._json(400, {"error": {"code": 400, "message": "the request exceeds the available context size"}})
            if body.get("verbose"):  # llama-server's debug answer, as the call-opener probe reads it
                return self._json(200, {"choices": [], "__verbose": {"generation_settings": {"grammar_triggers": [
                    {"type": 1, "value": "<tool_call>"}, {"type": 1, "value": '{"type": "function",'}]}}})
            n = body.get("max_tokens") or 5
            self.send_response(200); self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked"); self.end_headers()
            def send(obj):
                data = b"data: " + json.dumps(obj).encode() + b"\n\n"
                if os.environ.get("FAKE_SPLIT"):  # each event in two writes, so reads end mid-event
                    for part in (data[:9], data[9:]):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part)); self.wfile.flush(); time.sleep(0.003)
                    return
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data)); self.wfile.flush()
            chat = self.path.endswith("chat/completions")
            try:
                for i in range(n):
                    choice = {"index": 0, "delta": {"content": f"tok{i} "}} if chat else {"index": 0, "text": f"tok{i} "}
                    send({"choices": [dict(choice, finish_reason=None)]})
                    time.sleep(delay)
                if chat and body.get("tools"):
                    send({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                          "function": {"name": "set_light", "arguments": "{\"room\":"}}]}, "finish_reason": None}]})
                    send({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": " \"den\"}"}}]},
                          "finish_reason": None}]})
                send({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls" if body.get("tools") else "length"}]})
                send({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}})
                data = b"data: [DONE]\n\n"
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)); self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                if log:
                    open(log, "a").write(json.dumps({"cancelled_at": i}) + "\n")

    class S(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True
        def get_request(self):
            conn, _ = super().get_request()
            return conn, ("fake", 0)
    if os.path.exists(sock):
        os.unlink(sock)
    S(sock, H).serve_forever()
''')


@pytest.fixture
def fake_spec(tmp_path: Path) -> ServerSpec:
    script = tmp_path / "fake_llama_server.py"
    script.write_text(FAKE_SERVER)
    return ServerSpec(name="m", model_path=tmp_path / "m.gguf", socket_path=tmp_path / "run" / "m.sock", context=128,
                      slots=2, command=(sys.executable, str(script)))


def chat(**kw: object) -> GenerationRequest:
    return GenerationRequest(model="m", kind="chat", messages=({"role": "user", "content": "hi"},), **kw)  # type: ignore[arg-type]


async def collect(up: ServerUpstream, req: GenerationRequest) -> tuple[list[TokenChunk], Finished]:
    chunks: list[TokenChunk] = []
    async for ev in up.generate(req):
        if isinstance(ev, TokenChunk):
            chunks.append(ev)
        else:
            return chunks, ev
    raise AssertionError("no Finished")


def test_flags_are_explicit_and_the_socket_is_private(fake_spec: ServerSpec) -> None:
    argv = fake_spec.argv()
    flags = dict(zip(argv[2::1], argv[3::1], strict=False))
    assert flags["--host"].endswith(".sock") and flags["--host"] == str(fake_spec.socket_path)
    assert flags["--ctx-size"] == "256" and flags["--parallel"] == "2"  # context is per slot
    assert flags["--n-gpu-layers"] == "all" and flags["--fit"] == "off"
    assert "--port" not in argv and "--jinja" in argv and "--no-webui" in argv
    assert all(f.doc for f in FLAGS)
    gemma = ServerSpec(name="g", model_path=Path("g.gguf"), socket_path=Path("g.sock"), context=512,
                       chat_format="gemma", command=("x",))
    argv = gemma.argv()
    assert argv[argv.index("--chat-template-file") + 1].endswith("templates/gemma.jinja")


def test_request_mapping_names_every_field() -> None:
    tools = ({"type": "function", "function": {"name": "set_light", "parameters": {"type": "object"}}},)
    path, body = server_body(chat(temperature=0.0, seed=7, stop=("\n",), tools=tools, tool_choice="auto",
                                  parallel_tool_calls=False, response_format={"type": "json_object"},
                                  logprobs=True, top_logprobs=2, think=False, max_tokens=9,
                                  presence_penalty=0.5, extra={"mirostat": 2, "num_ctx": 64}))
    assert path == "/v1/chat/completions"
    assert body["tools"] == list(tools) and body["tool_choice"] == "auto" and body["parallel_tool_calls"] is False
    assert body["response_format"] == {"type": "json_object"} and body["logprobs"] is True and body["top_logprobs"] == 2
    assert body["cache_prompt"] is False and body["seed"] == 7 and body["max_tokens"] == 9
    assert body["chat_template_kwargs"] == {"enable_thinking": False} and body["presence_penalty"] == 0.5
    assert body["mirostat"] == 2 and "num_ctx" not in body and body["stream"] is True
    # 'required' (or a named function): llama.cpp's own grammar for the template's call syntax, begun with the
    # template's call opener as a prefilled assistant turn so that nothing but the call can come.
    two = (*tools, {"type": "function", "function": {"name": "get_temperature"}})
    _, body = server_body(chat(tools=two, tool_choice={"type": "function", "function": {"name": "set_light"}}),
                          "<tool_call>")
    assert body["tools"] == list(tools) and body["tool_choice"] == "required" and "response_format" not in body
    assert body["messages"][-1] == {"role": "assistant", "content": "<tool_call>"}
    assert body["parallel_tool_calls"] is False and body["stop"] == ["<tool_call>"]  # forced: one call by default
    _, body = server_body(chat(tools=two, tool_choice="required", parallel_tool_calls=True), "[TOOL_CALLS]")
    assert body["tools"] == list(two) and body["parallel_tool_calls"] is True
    assert body["messages"][-1]["content"] == "[TOOL_CALLS]" and len(body["messages"]) == 2
    # One call only: where each call opens with its own marker, the marker stops a second one; not '{' (JSON).
    _, body = server_body(chat(tools=two, tool_choice="required", parallel_tool_calls=False, stop=("\n\n",)),
                          "<tool_call>\n")
    assert body["stop"] == ["\n\n", "<tool_call>"]
    _, body = server_body(chat(tools=two, tool_choice="required", parallel_tool_calls=False), "{")
    assert body["messages"][-1]["content"] == "{" and "stop" not in body
    _, body = server_body(chat(tools=two, tool_choice="required"))  # no opener known: llama.cpp's grammar alone
    assert body["tool_choice"] == "required" and len(body["messages"]) == 1
    path, body = server_body(GenerationRequest(model="m", kind="completion", prompt="Once"))
    assert path == "/v1/completions" and body["prompt"] == "Once" and "cache_prompt" not in body


async def test_generate_streams_reports_load_and_counts(fake_spec: ServerSpec) -> None:
    server = ServerProcess(fake_spec)
    server.start()
    try:
        assert await server.wait_ready(10), server.error
        assert server.info["slots"] == 2 and server.info["context_length"] == 128
        off = server.info["offload"]
        assert off["layers_offloaded"] == 3 and off["devices_used"] == ["Vulkan0"] and off["backend"] == "Vulkan0"
        up = ServerUpstream(server, queue_depth=2)
        chunks, fin = await collect(up, chat(max_tokens=4))
        assert "".join(c.text for c in chunks) == "tok0 tok1 tok2 tok3 "
        assert fin.finish_reason == "length" and fin.completion_tokens == 4 and fin.prompt_tokens == 3
        tools = ({"type": "function", "function": {"name": "set_light"}},)
        chunks, fin = await collect(up, chat(max_tokens=1, tools=tools))
        assert fin.finish_reason == "tool_calls"
        calls = [c for ch in chunks for c in ch.tool_calls]
        assert calls[0]["function"]["name"] == "set_light" and len(calls) == 2
    finally:
        await server.stop()


async def test_server_killed_mid_stream_gives_clean_error_then_recovers(fake_spec: ServerSpec) -> None:
    server = ServerProcess(fake_spec, backoff=Backoff(first=0.05))
    os.environ["FAKE_DELAY"] = "0.05"
    server.start()
    try:
        assert await server.wait_ready(10)
        up = ServerUpstream(server)
        got = 0
        with pytest.raises(UpstreamError) as e:
            async for ev in up.generate(chat(max_tokens=50)):
                if isinstance(ev, TokenChunk):
                    got += 1
                    if got == 3:
                        assert server.pid
                        os.kill(server.pid, signal.SIGKILL)
        assert not e.value.before_first_token and e.value.status == 503
        for _ in range(200):
            if server.restarts >= 1 and server.ready.is_set():
                break
            await asyncio.sleep(0.02)
        assert server.restarts == 1 and server.state == "ready"
        assert "killed" in (server.error or "") or server.state == "ready"
        _, fin = await collect(up, chat(max_tokens=2))
        assert fin.completion_tokens == 2
    finally:
        os.environ.pop("FAKE_DELAY", None)
        await server.stop()


async def test_queue_bound_is_slots_plus_queue(fake_spec: ServerSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_DELAY", "0.2")
    server = ServerProcess(fake_spec)
    server.start()
    try:
        assert await server.wait_ready(10)
        up = ServerUpstream(server, queue_depth=1)  # two slots + one waiting
        assert up.capacity == 3
        streams = [up.generate(chat(max_tokens=20)) for _ in range(3)]
        firsts = await asyncio.gather(*(s.__anext__() for s in streams))
        assert all(isinstance(f, TokenChunk) for f in firsts)
        with pytest.raises(QueueFull) as e:
            await up.generate(chat(max_tokens=1)).__anext__()
        assert e.value.status == 429 and e.value.retry_after and e.value.retry_after >= 1
        for s in streams:
            await s.aclose()
    finally:
        await server.stop()


async def test_closing_the_stream_cancels_in_the_server(fake_spec: ServerSpec, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "fake.log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_DELAY", "0.05")
    server = ServerProcess(fake_spec)
    server.start()
    try:
        assert await server.wait_ready(10)
        up = ServerUpstream(server)
        stream = up.generate(chat(max_tokens=200))
        for _ in range(3):
            await stream.__anext__()
        await stream.aclose()
        await up.close()  # drop pooled connections too, like the agent does on shutdown
        for _ in range(60):
            if "cancelled_at" in log.read_text():
                break
            await asyncio.sleep(0.05)
        cancelled = [json.loads(line)["cancelled_at"] for line in log.read_text().splitlines() if "cancelled_at" in line]
        assert cancelled and cancelled[0] < 50
    finally:
        await server.stop()


async def test_a_forced_call_is_begun_with_the_template_s_own_opener(fake_spec: ServerSpec, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """tool_choice required: the opener is asked of the server once (its grammar trigger word, not the JSON
    wrapper one), then every forced call is sent with it as a prefilled assistant turn; tool calls stream."""
    log = tmp_path / "fake.log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    server = ServerProcess(fake_spec)
    server.start()
    try:
        assert await server.wait_ready(10)
        up = ServerUpstream(server)
        tools = ({"type": "function", "function": {"name": "set_light"}},)
        for _ in range(2):
            chunks, fin = await collect(up, chat(tools=tools, tool_choice="required", max_tokens=1))
            calls = [c for chunk in chunks for c in chunk.tool_calls]
            assert fin.finish_reason == "tool_calls" and calls[0]["function"]["name"] == "set_light"
        _, fin = await collect(up, chat(tools=tools, tool_choice="auto", max_tokens=1))
        sent = [json.loads(line) for line in log.read_text().splitlines()]
        probes = [s["body"] for s in sent if s["body"].get("verbose")]
        calls = [s["body"] for s in sent if s["body"].get("stream")]
        assert len(probes) == 1 and probes[0]["tools"] and probes[0]["max_tokens"] == 1
        assert [b["messages"][-1] for b in calls[:2]] == [{"role": "assistant", "content": "<tool_call>"}] * 2
        assert calls[2]["messages"][-1]["role"] == "user" and calls[2]["tool_choice"] == "auto"
        await up.close()
    finally:
        await server.stop()


async def test_events_split_across_reads_and_a_second_call_dropped(fake_spec: ServerSpec,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An event cut across two reads arrives whole.
    With parallel_tool_calls false, deltas of a second call are dropped (some formats' grammars allow one)."""
    from hearth.serving.local import _first_call_only

    monkeypatch.setenv("FAKE_SPLIT", "1")
    server = ServerProcess(fake_spec)
    server.start()
    try:
        assert await server.wait_ready(10)
        up = ServerUpstream(server)
        chunks, fin = await collect(up, chat(max_tokens=4))
        assert [c.text for c in chunks] == ["tok0 ", "tok1 ", "tok2 ", "tok3 "] and fin.completion_tokens == 4
        await up.close()
    finally:
        await server.stop()
    two = TokenChunk("", tool_calls=({"index": 0, "function": {"arguments": "}"}},
                                     {"index": 1, "id": "c2", "function": {"name": "set_light"}}))
    kept = _first_call_only(two)
    assert kept is not None and [c["index"] for c in kept.tool_calls] == [0]
    assert _first_call_only(TokenChunk("", tool_calls=({"index": 1, "function": {"arguments": "{"}},))) is None


async def test_load_failure_is_retried_and_reported_with_llama_cpp_s_words(fake_spec: ServerSpec,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_FAIL_LOAD", "1")
    server = ServerProcess(fake_spec, backoff=Backoff(first=0.01, limit=0.02))
    server.start()
    try:
        for _ in range(200):
            if server.restarts >= 3:
                break
            await asyncio.sleep(0.02)
        assert server.state == "failed" and server.restarts >= 3
        assert "error loading model" in (server.error or "") or "loading error" in (server.error or ""), server.error
        up = ServerUpstream(server, ready_wait=0.2)
        with pytest.raises(UpstreamError) as e:
            await up.generate(chat()).__anext__()
        assert e.value.status == 503 and "failed to load" in e.value.message
    finally:
        await server.stop()


async def test_a_refusal_from_the_server_is_a_400_with_its_reason(fake_spec: ServerSpec) -> None:
    server = ServerProcess(fake_spec)
    server.start()
    try:
        assert await server.wait_ready(10)
        up = ServerUpstream(server)
        with pytest.raises(UpstreamError) as e:
            await up.generate(GenerationRequest(model="m", kind="completion", prompt="too long")).__anext__()
        assert e.value.status == 400 and "context" in e.value.message and e.value.hint
    finally:
        await server.stop()


async def test_request_to_a_just_killed_server_waits_for_the_next_one(fake_spec: ServerSpec) -> None:
    server = ServerProcess(fake_spec, backoff=Backoff(first=0.05))
    server.start()
    try:
        assert await server.wait_ready(10)
        up = ServerUpstream(server)
        assert server.pid
        os.kill(server.pid, signal.SIGKILL)
        _, fin = await collect(up, chat(max_tokens=2))
        assert fin.completion_tokens == 2 and server.restarts >= 1
    finally:
        await server.stop()
