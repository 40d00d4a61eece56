"""``hearth agent`` as a process: /health 503 -> 200, serving over HTTP, worker crash mid-stream, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")

AgentFactory = Any
RunningAgent = Any  # the fixtures' types live in conftest.py


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_health_is_503_while_loading_then_200_and_sigterm_exits_0(agent_factory: AgentFactory, gemma_path: Path,
                                                                   llama_runtime: Any) -> None:
    agent = agent_factory(gemma_path, wait=False)
    codes: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert agent.process.poll() is None, agent.log()
        try:
            r = agent.health()
        except httpx.HTTPError:
            time.sleep(0.02)
            continue
        codes.append(r.status_code)
        if r.status_code == 200:
            break
        assert r.status_code == 503 and r.json()["status"] == "loading"
        time.sleep(0.02)
    assert codes and codes[-1] == 200, agent.log()
    assert 503 in codes, "the API came up only after the model had loaded"
    body = agent.health().json()
    model = body["models"][gemma_path.stem]
    assert model["state"] == "ready" and model["offload"]["layers_total"] > 0
    worker_pid = model["pid"]
    assert agent.stop() == 0
    assert "stopped" in agent.log()
    assert not _pid_alive(worker_pid)


def test_worker_crash_mid_stream_then_next_request_succeeds(running_agent: RunningAgent) -> None:
    url = running_agent.url
    pid = running_agent.health().json()["models"][running_agent.model]["pid"]
    body = {"model": running_agent.model, "prompt": "Once upon a time", "max_tokens": 300, "stream": True,
            "temperature": 0}
    pieces = 0
    lines: list[str] = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith("data: {") and '"text"' in line:
                pieces += 1
                if pieces == 5:
                    os.kill(pid, signal.SIGKILL)
    # The stream ended (no hang) with fewer than the 300 tokens asked for.
    assert 5 <= pieces < 300
    start = time.monotonic()
    r2 = httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 5}, timeout=60)
    assert r2.status_code == 200, r2.text
    assert r2.json()["usage"]["completion_tokens"] == 5
    print(f"next request answered {time.monotonic() - start:.2f}s after the crash")
    health = running_agent.health().json()["models"][running_agent.model]
    assert health["restarts"] == 1 and health["pid"] != pid
    assert running_agent.process.poll() is None


def test_openai_client_streams_from_the_agent(running_agent: RunningAgent) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=running_agent.url + "/v1", api_key="unused-on-loopback")
    stream = client.completions.create(model=running_agent.model, prompt="The capital of France is the city of",
                                       max_tokens=8, temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert "Paris" in text


def test_unservable_model_reports_error_and_keeps_running(agent_factory: AgentFactory, tmp_path: Path,
                                                          llama_runtime: Any) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    agent = agent_factory(bad, wait=False)
    deadline = time.monotonic() + 60
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            r = agent.health()
        except httpx.HTTPError:
            time.sleep(0.05)
            continue
        assert r.status_code == 503
        body = r.json()
        if body.get("warnings"):
            break
        time.sleep(0.05)
    assert body.get("warnings"), agent.log()
    assert "broken" in json.dumps(body)
    assert agent.process.poll() is None
    assert agent.stop() == 0


def test_sd_notify_ready_watchdog_and_stopping_without_systemd_python(tmp_path: Path, free_port: int) -> None:
    """Under systemd (Type=notify, WatchdogSec) the agent says READY, pets the watchdog and says STOPPING."""
    import socket
    import subprocess
    import sys

    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(0.1)
    config = tmp_path / "hearth.yaml"
    config.write_text(json.dumps({"api": {"host": "127.0.0.1", "port": free_port}, "state": {"dir": str(tmp_path / "s")},
                                  "model": {"name": "none"}, "mesh": {"enabled": False}}))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "400000", "JOURNAL_STREAM": "8:1"}
    proc = subprocess.Popen([sys.executable, "-m", "hearth", "--config", str(config), "agent"], env=env,
                            stderr=subprocess.PIPE, text=True)
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in messages) < 2:
            try:
                messages.append(listener.recv(4096).decode())
            except TimeoutError:
                pass
        assert httpx.get(f"http://127.0.0.1:{free_port}/health", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    while True:
        try:
            messages.append(listener.recv(4096).decode())
        except TimeoutError:
            break
    listener.close()
    assert proc.returncode == 0, stderr
    joined = "\n".join(messages)
    assert "READY=1" in joined and "WATCHDOG=1" in joined and "STOPPING=1" in joined
    assert joined.index("READY=1") < joined.index("STOPPING=1")
    # journald-friendly: priority prefixes, no timestamps.
    assert "<6>hearth.agent: stopped" in stderr.splitlines()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_100_concurrent_clients_complete_or_get_429(agent_factory: AgentFactory, gemma_path: Path,
                                                     llama_runtime: Any) -> None:
    import asyncio

    agent = agent_factory(gemma_path, api__queue_depth=4)
    body = {"model": agent.model, "prompt": "Tell me about the hearth.", "max_tokens": 4, "temperature": 0}
    rss_before = _rss_kib(agent.process.pid)

    async def one(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(agent.url + "/v1/completions", json=body)

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            return await asyncio.gather(*(one(client) for _ in range(100)))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429, 503}, codes
    assert codes.count(200) >= 5  # one running + four waiting at least got through
    busy = [r for r in responses if r.status_code == 429]
    assert busy and all(r.headers.get("retry-after") for r in busy)
    assert all(r.json()["usage"]["completion_tokens"] == 4 for r in responses if r.status_code == 200)
    # The node is still serving, and its memory did not grow with the burst.
    r = httpx.post(agent.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200
    assert _rss_kib(agent.process.pid) - rss_before < 64 * 1024
    print(f"100 clients: {codes.count(200)} served, {len(busy)} told 429")
