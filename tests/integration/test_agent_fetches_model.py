"""``hearth agent`` whose model is a catalogue entry not in the store: it fetches it in the background.

The catalogue (``HEARTH_CATALOGUE``) has one entry whose source is a loopback HTTP server serving a
generated GGUF with Range support, slowly enough to watch the progress. /health says 503 with the
progress line while the file comes, then 200 and a completion works. With the server down the agent
stays up, /health says 503 "error" with the reason, and it recovers once the server comes back.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("gguf")

AgentFactory = Any  # the fixtures' types live in conftest.py


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory, gguf_maker: Any) -> Path:
    """A tiny model of a few MiB: bigger than the download's 1 MiB chunk, so progress shows between chunks."""
    return Path(gguf_maker(tmp_path_factory.mktemp("src") / "tiny-model.gguf", n_embd=256, n_ff=512))


class Handler(BaseHTTPRequestHandler):
    """GET of one file with Range and an ETag, 64 KiB at a time with a pause (a slow link)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        data: bytes = self.server.data  # type: ignore[attr-defined]
        self.server.ranges.append(self.headers.get("Range"))  # type: ignore[attr-defined]
        start, status = 0, 200
        m = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if m and self.headers.get("If-Range") in (None, '"v1"'):
            start, status = int(m.group(1)), 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"v1"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        try:
            for i in range(0, len(body), 65536):
                self.wfile.write(body[i:i + 65536])
                time.sleep(self.server.delay)  # type: ignore[attr-defined]
        except (BrokenPipeError, ConnectionResetError):
            pass


class Server:
    """The loopback model server; start() and stop() it at will on the same port."""

    def __init__(self, data: bytes, port: int, delay: float) -> None:
        self.data, self.port, self.delay = data, port, delay
        self.httpd: ThreadingHTTPServer | None = None
        self.ranges: list[str | None] = []
        """The Range header of every request, in order (None for a whole-file GET)."""

    def start(self) -> None:
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        httpd.daemon_threads = True
        httpd.data, httpd.delay, httpd.ranges = self.data, self.delay, self.ranges  # type: ignore[attr-defined]
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.httpd = httpd

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_catalogue(path: Path, data: bytes, port: int, display_name: str = "Tiny") -> Path:
    """A one-entry catalogue: 'tiny', the GGUF *data*, served at http://127.0.0.1:*port*/tiny-model.gguf."""
    path.write_text(f"""models:
  - name: tiny
    display_name: {display_name}
    family: test
    parameters_b: 0.01
    quantization: F32
    file: tiny-model.gguf
    size_bytes: {len(data)}
    sources: ["http://127.0.0.1:{port}/tiny-model.gguf"]
    sha256: {hashlib.sha256(data).hexdigest()}
    licence: test
    context_length: 256
    n_layers: 2
    n_kv_heads: 4
    head_dim: 64
    embedding_length: 256
""")
    return path


@pytest.fixture
def catalogue(tmp_path: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """A one-entry catalogue ('tiny') whose source is a loopback server (not started yet)."""
    data = model_file.read_bytes()
    server = Server(data, _free_port(), delay=0.04)
    path = write_catalogue(tmp_path / "models.yaml", data, server.port)
    monkeypatch.setenv("HEARTH_CATALOGUE", str(path))
    monkeypatch.setenv("HEARTH_ACQUIRE_BACKOFF", "0.3,1")
    yield server
    server.stop()


def _health(agent: Any) -> httpx.Response | None:
    try:
        return agent.health()  # type: ignore[no-any-return]
    except httpx.HTTPError:
        return None


def _complete(agent: Any) -> str:
    r = httpx.post(agent.url + "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 4},
                   timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def test_missing_catalogue_model_is_downloaded_then_served(agent_factory: AgentFactory, catalogue: Server,
                                                           llama_runtime: Any) -> None:
    catalogue.start()
    agent = agent_factory("tiny", wait=False)
    progress: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert agent.process.poll() is None, agent.log()
        r = _health(agent)
        if r is None:
            time.sleep(0.02)
            continue
        if r.status_code == 200:
            break
        body = r.json()
        assert r.status_code == 503 and body["status"] == "loading", body
        progress += [w for w in body["warnings"] if re.fullmatch(r"downloading tiny: \d+% \(.+ of .+ MiB\)", w)]
        time.sleep(0.05)
    assert agent.health().status_code == 200, agent.log()
    assert progress, "no progress line seen while downloading"
    body = agent.health().json()
    assert body["models"]["tiny"]["state"] == "ready" and "download" not in body
    assert (agent.state_dir / "models" / "tiny-model.gguf").is_file()
    assert not list((agent.state_dir / "models" / ".partial").glob("*.part"))
    assert _complete(agent)


def test_source_down_is_an_error_the_agent_survives_and_recovers(agent_factory: AgentFactory, catalogue: Server,
                                                                 llama_runtime: Any) -> None:
    agent = agent_factory("tiny", wait=False)  # the server is not listening: connection refused
    deadline = time.monotonic() + 60
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        assert agent.process.poll() is None, agent.log()
        r = _health(agent)
        if r is not None:
            assert r.status_code == 503
            body = r.json()
            if body["status"] == "error" and body["download"]["attempts"] >= 2:
                break
        time.sleep(0.05)
    assert body.get("status") == "error", body
    assert any(w.startswith("download of tiny failed: cannot connect to 127.0.0.1") for w in body["warnings"]), body
    assert agent.process.poll() is None
    catalogue.start()
    agent.wait_ready(timeout=60)
    assert _complete(agent)


def test_sigterm_mid_download_keeps_the_partial_and_the_next_start_resumes(
        agent_factory: AgentFactory, catalogue: Server, llama_runtime: Any) -> None:
    catalogue.delay = 0.15  # slow: about 0.4 MiB/s
    catalogue.start()
    agent = agent_factory("tiny", wait=False)
    partial = agent.state_dir / "models" / ".partial"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        part = partial / "tiny-model.gguf.part"
        if part.is_file() and part.stat().st_size >= 1 << 20:
            break
        assert agent.process.poll() is None, agent.log()
        time.sleep(0.05)
    t0 = time.monotonic()
    assert agent.stop() == 0, agent.log()
    assert time.monotonic() - t0 < 15, "shutdown waited for the download"
    done = (partial / "tiny-model.gguf.part").stat().st_size
    assert done >= 1 << 20 and (partial / "tiny-model.gguf.journal.json").is_file()
    assert not (agent.state_dir / "models" / "tiny-model.gguf").exists()

    catalogue.httpd.delay = 0.0  # type: ignore[union-attr]
    again = agent_factory("tiny", wait=False, state__dir=str(agent.state_dir))
    again.wait_ready(timeout=120)
    assert catalogue.ranges[-1] == f"bytes={done}-", catalogue.ranges
    assert _complete(again)


def _models(agent: Any) -> list[str]:
    r = httpx.get(agent.url + "/v1/models", timeout=10)
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["data"]]


def test_a_stored_model_stands_in_while_the_chosen_one_downloads(
        agent_factory: AgentFactory, catalogue: Server, gguf_maker: Any, tmp_path: Path, llama_runtime: Any) -> None:
    """A stick set up without internet (or before the download is done) still answers: the model on the
    stick serves until the chosen catalogue model is in, then the node switches to it."""
    state = tmp_path / "node"
    (state / "models").mkdir(parents=True)
    gguf_maker(state / "models" / "standin.gguf", seed=3)
    catalogue.delay = 0.1  # a few seconds of download: long enough to use the stand-in meanwhile
    catalogue.start()
    agent = agent_factory("tiny", wait=False, state__dir=str(state))
    agent.wait_ready(timeout=60)
    body = agent.health().json()
    assert "download" in body, body  # ready while the chosen model is still coming
    assert "serving standin from the store until tiny has arrived" in body["warnings"], body
    assert _models(agent) == ["standin"]
    r = httpx.post(agent.url + "/v1/completions", json={"model": "standin", "prompt": "hi", "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 120
    while _models(agent) != ["tiny"]:
        assert time.monotonic() < deadline, (agent.health().json(), agent.log())
        assert agent.process.poll() is None, agent.log()
        time.sleep(0.2)
    body = agent.health().json()
    assert body["status"] == "ready" and "download" not in body and not any("standin" in w for w in body["warnings"])
    assert _complete(agent)
    # The stand-in leaves the router first, then its llama-server is stopped (seconds on a busy machine).
    while "stopped the stand-in model standin" not in agent.log():
        assert time.monotonic() < deadline + 30, agent.log()
        time.sleep(0.2)
