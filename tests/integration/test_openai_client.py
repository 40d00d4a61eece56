"""The official ``openai`` client (and httpx for the Ollama endpoints) against a real ``hearth agent``
serving Gemma 3 270M through llama-cpp-python: streaming and not, errors as the client's exceptions.

The tests share one agent (module scope) and leave it as they found it; the key test starts its own."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

openai = pytest.importorskip("openai")

RunningAgent = Any
AgentFactory = Any


@dataclass
class SharedAgent:
    """One agent for the whole module (starting one per test costs ~10 s here)."""

    process: subprocess.Popen[bytes]
    url: str
    model: str
    log_path: Path

    def health(self) -> httpx.Response:
        return httpx.get(self.url + "/health", timeout=5)


@pytest.fixture(scope="module")
def running_agent(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path, llama_runtime: Any) -> Iterator[SharedAgent]:
    state = tmp_path_factory.mktemp("agent")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = {"api": {"host": "127.0.0.1", "port": port}, "state": {"dir": str(state)},
           "model": {"name": str(gemma_path), "threads": 2}, "mesh": {"enabled": False}}
    (state / "hearth.yaml").write_text(yaml.safe_dump(cfg))
    log_path = state / "agent.log"
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "hearth", "--config", str(state / "hearth.yaml"), "agent"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    agent = SharedAgent(proc, f"http://127.0.0.1:{port}", gemma_path.stem, log_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if agent.health().status_code == 200:
                    break
            time.sleep(0.05)
        yield agent
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def client(running_agent: SharedAgent) -> Any:
    return openai.OpenAI(base_url=running_agent.url + "/v1", api_key="unused-on-loopback", max_retries=0, timeout=60)


def test_models_list(client: Any, running_agent: RunningAgent) -> None:
    assert [m.id for m in client.models.list()] == [running_agent.model]
    assert client.models.retrieve(running_agent.model).id == running_agent.model


def test_chat_whole_and_streamed_agree(client: Any, running_agent: RunningAgent) -> None:
    ask = {"model": running_agent.model, "messages": [{"role": "user", "content": "Name three colours."}],
           "max_tokens": 12, "temperature": 0, "seed": 3}
    whole = client.chat.completions.create(**ask)
    text = whole.choices[0].message.content
    assert whole.object == "chat.completion" and whole.model == running_agent.model
    assert isinstance(text, str) and text
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert 0 < whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 5

    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert {c.id for c in chunks} == {chunks[0].id}
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # greedy sampling: the same answer either way
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason


def test_completion_whole_and_streamed(client: Any, running_agent: RunningAgent) -> None:
    ask = {"model": running_agent.model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    whole = client.completions.create(**ask)
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.usage.completion_tokens <= 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(**ask, stream=True))
    assert streamed == whole.choices[0].text
    # stop ends the text before the stop string
    cut = client.completions.create(**{**ask, "max_tokens": 30, "stop": [whole.choices[0].text.strip()[:3]]})
    assert whole.choices[0].text.strip()[:3] not in cut.choices[0].text


def test_errors_are_client_exceptions_and_the_agent_keeps_serving(client: Any, running_agent: RunningAgent) -> None:
    msg = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="no-such-model", messages=msg)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=running_agent.model, messages=msg, max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        client.chat.completions.create(model=running_agent.model, messages=msg, n=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=running_agent.model, prompt="the house by the fire " * 20000, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="embeddings"):
        client.embeddings.create(model=running_agent.model, input="hello")
    r = httpx.post(running_agent.url + "/v1/chat/completions", content=b'{"model": ', timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    ok = client.chat.completions.create(model=running_agent.model, messages=msg, max_tokens=3)
    assert ok.choices[0].message.content is not None
    assert running_agent.health().status_code == 200


def test_ollama_endpoints(running_agent: RunningAgent) -> None:
    url, model = running_agent.url, running_agent.model
    tags = httpx.get(url + "/api/tags", timeout=10).json()["models"]
    assert [t["name"] for t in tags] == [f"{model}:latest"]
    assert httpx.get(url + "/api/ps", timeout=10).json()["models"][0]["name"] == f"{model}:latest"
    assert httpx.get(url + "/api/version", timeout=10).json()["version"]

    body = {"model": f"{model}:latest", "messages": [{"role": "user", "content": "Say hello."}],
            "options": {"temperature": 0, "num_predict": 6, "seed": 1}}
    with httpx.stream("POST", url + "/api/chat", json=body, timeout=60) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"] is True
    assert lines[-1]["eval_count"] == len(lines) - 1 <= 6
    streamed = "".join(x["message"]["content"] for x in lines)
    whole = httpx.post(url + "/api/chat", json={**body, "stream": False}, timeout=60).json()
    assert whole["message"]["content"] == streamed and whole["done_reason"] in ("stop", "length")

    gen = httpx.post(url + "/api/generate", json={"model": model, "prompt": "Once upon a time", "stream": False,
                                                  "options": {"num_predict": 5, "temperature": 0}}, timeout=60).json()
    assert gen["response"] and gen["eval_count"] <= 5 and gen["prompt_eval_count"] > 0


def test_keys_off_loopback(agent_factory: AgentFactory, gemma_path: Path, llama_runtime: Any) -> None:
    agent = agent_factory(gemma_path, api__open_loopback=False)
    key = json.loads((agent.state_dir / "api-keys").read_text())["keys"][0]["key"]
    assert ((agent.state_dir / "api-keys").stat().st_mode & 0o777) == 0o600
    wrong = openai.OpenAI(base_url=agent.url + "/v1", api_key="hearth-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        wrong.models.list()
    right = openai.OpenAI(base_url=agent.url + "/v1", api_key=key, max_retries=0)
    out = right.chat.completions.create(model=agent.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert out.usage.completion_tokens <= 2


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_hanging_up_stops_the_generation(running_agent: RunningAgent) -> None:
    url = running_agent.url
    before = _metric(url, "hearth_generated_tokens_total")
    body = {"model": running_agent.model, "prompt": "Once upon a time", "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n >= 10:
                break
    # The worker stops within moments: the token count settles far below 1500 and the queue empties.
    deadline = time.monotonic() + 10
    settled = -1.0
    while time.monotonic() < deadline:
        now = _metric(url, "hearth_generated_tokens_total")
        if now == settled and _metric(url, "hearth_queue_depth") == 0:
            break
        settled = now
        time.sleep(0.5)
    assert _metric(url, "hearth_queue_depth") == 0
    assert settled - before < 300, (before, settled)
    assert _metric(url, "hearth_api_client_disconnects_total") >= 1
