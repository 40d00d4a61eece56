"""Integration fixtures: a tiny generated GGUF model, and a running ``hearth agent`` serving a model.

``tiny_gguf`` is a llama-architecture model with a SentencePiece-style vocabulary and seeded random
weights (a few hundred KB, loads in milliseconds): for tests where text quality does not matter.
``running_agent`` starts the real daemon (``python -m hearth agent``) on a free loopback port with its
own state directory, waits until /health says ready, and stops it with SIGTERM afterwards;
``agent_factory`` starts more of them (other models, other settings).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import string
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tiny_gguf(path: Path, *, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_ff: int = 128,
                   n_ctx: int = 256, seed: int = 0, chat_template: str | None = TINY_CHAT_TEMPLATE) -> Path:
    """Write a tiny llama-architecture GGUF with a byte-fallback SentencePiece vocabulary."""
    import gguf  # type: ignore[import-untyped]
    import numpy as np

    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = list(string.ascii_letters + string.digits + ".,!?;:'-")
    words = ["the", "and", "of", "to", "in", "is", "it", "hello", "world", "Hearth", "model", "house", "fire",
             "tell", "me", "story", "once", "upon", "time", "there", "was"]
    for p in dict.fromkeys(pieces + words):  # llama.cpp aborts on a duplicate token
        tokens.append("\u2581" + p)
        types.append(gguf.TokenType.NORMAL)
    for p in dict.fromkeys(pieces + words):
        tokens.append(p)
        types.append(gguf.TokenType.NORMAL)
    tokens.append("\u2581")
    types.append(gguf.TokenType.NORMAL)
    scores = [0.0, 0.0, 0.0] + [-1000.0] * 256 + [-float(len(t)) * 0.1 - i * 1e-4 for i, t in enumerate(tokens[259:])]
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_file_type(0)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    if chat_template:
        w.add_chat_template(chat_template)
    rng = np.random.default_rng(seed)

    def t(*shape: int) -> Any:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    w.add_tensor("token_embd.weight", t(n_vocab, n_embd))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    out = t(n_vocab, n_embd)
    out[2] = 0.0  # keep </s> unlikely so generations run to max_tokens
    w.add_tensor("output.weight", out)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", t(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


CACHE = Path(os.environ.get("HEARTH_CACHE") or Path.home() / ".cache" / "hearth")


@pytest.fixture(scope="session")
def gguf_maker() -> Callable[..., Path]:
    """make_tiny_gguf, for tests that generate a model of their own (another template, size or seed)."""
    pytest.importorskip("gguf")
    return make_tiny_gguf


@pytest.fixture(scope="session")
def runtime_source() -> Callable[[str], bytes]:
    """A reader of files in the runtime's llama.cpp source (ci/runtime keeps its sdist under
    $HEARTH_CACHE/src): vocabularies under models/, chat templates under models/templates/."""
    sdists = sorted((CACHE / "src").glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        pytest.fail("the runtime's source (ci/runtime keeps it in $HEARTH_CACHE/src) is missing")

    def read(path: str) -> bytes:
        """The file whose path in the sdist ends with /*path* (e.g. 'models/templates/X.jinja')."""
        with tarfile.open(sdists[-1]) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("/" + path)), None)
            data = tar.extractfile(member) if member is not None else None
            if data is None:
                pytest.fail(f"{path} is not in the runtime's source {sdists[-1].name}")
            return data.read()

    return read


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated GGUF model (random weights, a chat template), for fast tests."""
    pytest.importorskip("gguf")
    return make_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="session")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated 4-layer llama (128 wide, F32): small enough for lavapipe, big enough to be a model."""
    pytest.importorskip("gguf")
    return make_tiny_gguf(tmp_path_factory.mktemp("small") / "small.gguf", n_embd=128, n_layer=4, n_head=4,
                          n_ff=256, n_ctx=256)


@pytest.fixture(scope="session")
def llama_runtime() -> Any:
    """llama-cpp-python with ggml's backends loaded (skips when the runtime is not installed)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    from hearth import llamacpp

    return llamacpp.load()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningAgent:
    """A ``hearth agent`` process serving on loopback."""

    process: subprocess.Popen[bytes]
    port: int
    state_dir: Path
    config_path: Path
    model: str
    log_path: Path

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        """Everything the agent wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def health(self) -> httpx.Response:
        """GET /health."""
        return httpx.get(self.url + "/health", timeout=5)

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        """Block until /health answers 200 (fails with the agent's log if it exits or times out)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"agent exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                r = self.health()
                if r.status_code == 200:
                    return dict(r.json())
            time.sleep(0.05)
        pytest.fail(f"agent not ready after {timeout}s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


AgentFactory = Callable[..., RunningAgent]


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[AgentFactory]:
    """Start ``hearth agent`` processes: ``agent_factory(model_path, wait=True, **settings)``.

    *settings* are dotted config keys with '__' for '.', e.g. ``api__queue_depth=2``. Every agent is
    stopped with SIGTERM at the end of the test.
    """
    started: list[RunningAgent] = []

    def start(model: Path | str, wait: bool = True, threads: int = 2, **settings: Any) -> RunningAgent:
        n = len(started)
        state = tmp_path / f"agent{n}"
        state.mkdir()
        port = _free_port()
        cfg: dict[str, dict[str, Any]] = {
            "api": {"host": "127.0.0.1", "port": port},
            "state": {"dir": str(state)},
            "model": {"name": str(model), "threads": threads},
            "mesh": {"enabled": False},
        }
        for key, value in settings.items():
            section, _, name = key.partition("__")
            cfg.setdefault(section, {})[name] = value
        config_path = state / "hearth.yaml"
        config_path.write_text(yaml.safe_dump(cfg))
        log_path = state / "agent.log"
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
        with log_path.open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "hearth", "--config", str(config_path), "agent"],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
        agent = RunningAgent(proc, port, state, config_path, Path(str(model)).stem, log_path)
        started.append(agent)
        if wait:
            agent.wait_ready()
        return agent

    yield start
    for agent in started:
        agent.stop()


@pytest.fixture
def running_agent(agent_factory: AgentFactory, gemma_path: Path, llama_runtime: Any) -> RunningAgent:
    """``hearth agent`` serving Gemma 3 270M on a loopback port, ready (the model name is its file stem)."""
    return agent_factory(gemma_path)
