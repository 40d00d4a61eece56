"""The serving engine: one llama.cpp ``llama-server`` per model, supervised by the agent.

llama.cpp's own server does what household apps need and a Python token loop cannot: N slots with
continuous batching, a prompt cache per slot, grammar-constrained JSON (``response_format``), and the
model family's own tool-call format through the GGUF's Jinja template. Hearth's API stays the one front
door (keys, the OpenAI and Ollama wire formats, routing, metrics, 429s); the server listens on a Unix
socket inside the agent's runtime directory (mode 0750, the agent's own user), which nothing else reaches.

``ServerProcess`` starts the server with explicit flags (``FLAGS``, decided by the profile: never the
server's own guesses), waits for its ``/health``, reads ``/props`` and llama.cpp's load report (layers
offloaded, the devices holding weights) from its log, pings it, and restarts it with backoff when it
dies. serving/local.py turns it into an upstream for the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .supervisor import Backoff, Supervised

log = logging.getLogger(__name__)

def templates_dir() -> Path:
    """Hearth's chat templates for GGUFs that carry none (Gemma 3 270M base): <chat_format>.jinja."""
    import importlib.resources

    return Path(str(importlib.resources.files("hearth.profiles") / "templates"))

DEFAULT_CONTEXT_CAP = 8192
"""Context per slot when neither config nor profile sets one and the model was trained for more."""

_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_BUFFER = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([0-9.]+) MiB")


@dataclass
class ServerSpec:
    """What one llama-server serves and how (the profile and config decide every field)."""

    name: str
    model_path: Path
    socket_path: Path
    context: int = 0
    """Context per slot in tokens; 0 means the model's own, capped at DEFAULT_CONTEXT_CAP."""
    slots: int = 1
    """Parallel sequences (continuous batching); the server's context is context x slots."""
    threads: int = 0
    """Generation threads; 0 lets llama.cpp choose."""
    gpu_layers: int = -1
    """Layers to offload; -1 means all."""
    chat_format: str = ""
    """A Hearth template name (profiles/templates/NAME.jinja) for GGUFs without a template of their own."""
    embedding: bool = False
    """Serve /v1/embeddings (models with a pooling head) instead of generation."""
    binary: Path | None = None
    """llama-server to run; None means the runtime's (hearth.llamacpp.server_binary())."""
    command: tuple[str, ...] = ()
    """Run this program instead of llama-server, with the same flags (tests use a fake server)."""
    repack: bool = True
    """llama.cpp's CPU weight repacking (faster interleaved kernels). rpc-server's plain CPU buffers never
    repack, so a reference run that must compute exactly like a pool turns it off."""
    rpc: tuple[str, ...] = ()
    """A pooled model (hearth.pool): the members' rpc-server endpoints (loopback addresses, through the
    mesh's channel for peers)."""
    rpc_devices: tuple[int, ...] = ()
    """The RPC devices to use, in the plan's order: llama.cpp numbers every device of those rpc-servers
    RPC0, RPC1, ... in endpoint order."""
    tensor_split: tuple[int, ...] = ()
    """Layers per device of rpc_devices (the output layer counting as one on the last), hearth.pool.plan's."""

    def context_per_slot(self) -> int:
        """The context each slot holds."""
        if self.context:
            return self.context
        trained = gguf_facts(self.model_path).get("context_length") or 0
        return min(int(trained), DEFAULT_CONTEXT_CAP) if trained else DEFAULT_CONTEXT_CAP

    def template_file(self) -> Path | None:
        """Hearth's template for this chat format, when there is one."""
        path = templates_dir() / f"{self.chat_format}.jinja" if self.chat_format else None
        return path if path is not None and path.is_file() else None

    def argv(self) -> list[str]:
        """The server's command line: the program, then every flag of FLAGS that applies."""
        if self.command:
            program = list(self.command)
        else:
            from .. import llamacpp

            program = [str(self.binary or llamacpp.server_binary())]
        args: list[str] = []
        for flag in FLAGS:
            value = flag.value(self)
            if value is None or value is False:
                continue
            args += [flag.name] if value is True else [flag.name, str(value)]
        return program + args


@dataclass(frozen=True)
class Flag:
    """One llama-server flag and how the spec decides it (None/False: left out; True: the bare flag)."""

    name: str
    value: Callable[[ServerSpec], Any]
    doc: str


FLAGS: tuple[Flag, ...] = (
    Flag("--model", lambda s: s.model_path, "the GGUF file"),
    Flag("--rpc", lambda s: ",".join(s.rpc) or None, "a pooled model: the members' rpc-servers (before --device)"),
    Flag("--device", lambda s: ",".join(f"RPC{i}" for i in s.rpc_devices) if s.rpc else None,
         "a pooled model: only the members' devices, in the plan's order (never this node's own GPU unasked)"),
    Flag("--tensor-split", lambda s: ",".join(map(str, s.tensor_split)) if s.rpc and s.tensor_split else None,
         "a pooled model: layers per member device"),
    Flag("--host", lambda s: s.socket_path, "a Unix socket (the path ends in .sock): no TCP port at all"),
    Flag("--ctx-size", lambda s: s.context_per_slot() * max(1, s.slots), "context of all slots together"),
    Flag("--parallel", lambda s: max(1, s.slots), "slots served at once, with continuous batching"),
    Flag("--threads", lambda s: s.threads or None, "generation threads (default: llama.cpp's choice)"),
    Flag("--threads-batch", lambda s: s.threads or None, "prompt threads, the same"),
    Flag("--n-gpu-layers", lambda s: "all" if s.gpu_layers < 0 else s.gpu_layers, "layers on the GPU"),
    Flag("--fit", lambda s: "off", "no automatic shrinking of layers or context: the profile sized them"),
    Flag("--jinja", lambda s: not s.embedding, "the model's own chat template (tool calls, reasoning)"),
    Flag("--chat-template-file", lambda s: s.template_file(), "Hearth's template for GGUFs without one"),
    Flag("--reasoning-format", lambda s: None if s.embedding else "deepseek",
         "a thinking model's thoughts go to reasoning_content"),
    Flag("--embeddings", lambda s: s.embedding, "an embedding model: /v1/embeddings only"),
    Flag("--batch-size", lambda s: s.context_per_slot() if s.embedding else None,
         "an embedding model reads each input in one batch: any input that fits the context"),
    Flag("--ubatch-size", lambda s: s.context_per_slot() if s.embedding else None, "the same, physically"),
    Flag("--no-repack", lambda s: not s.repack, "plain CPU kernels, as a pool's rpc-servers compute"),
    Flag("--no-webui", lambda s: True, "Hearth serves its own page"),
    Flag("--metrics", lambda s: True, "Prometheus counters at /metrics"),
    Flag("--slots", lambda s: True, "slot states at /slots"),
    Flag("--timeout", lambda s: 600, "seconds a request may wait on a slow client"),
    Flag("--no-warmup", lambda s: True, "answer sooner after a (re)start; the first request warms up"),
)
"""Every flag Hearth starts llama-server with, in one table."""


def gguf_facts(path: Path) -> dict[str, Any]:
    """Family, quantization, trained context, pooling and size from the GGUF header ({} if unreadable)."""
    try:
        from ..models.gguf import FILE_TYPES, read_metadata

        meta = read_metadata(path)
    except Exception:  # an unreadable header is reported by the server that tries to load it
        return {}
    arch = str(meta.get("general.architecture", ""))
    ftype = meta.get("general.file_type")
    try:
        quant = FILE_TYPES.get(int(ftype), str(ftype)) if ftype is not None else ""  # type: ignore[arg-type]
    except (TypeError, ValueError):
        quant = str(ftype)
    size = path.stat().st_size if path.exists() else 0
    return {"family": arch, "quantization": quant, "context_length": meta.get(f"{arch}.context_length"),
            "embedding": f"{arch}.pooling_type" in meta, "has_template": "tokenizer.chat_template" in meta,
            "size_bytes": size, "n_layer": meta.get(f"{arch}.block_count")}


class ServerProcess(Supervised):
    """One supervised llama-server: started, health-checked, restarted with backoff, stopped gracefully."""

    program = "llama-server"

    def __init__(self, spec: ServerSpec, load_timeout: float = 600.0, ping_interval: float = 5.0,
                 backoff: Backoff | None = None) -> None:
        super().__init__(f"model {spec.name}", backoff, log)
        self.spec = spec
        self.load_timeout = load_timeout
        self.ping_interval = ping_interval
        self.info: dict[str, Any] = {}
        self._offloaded: tuple[int, int] | None = None
        self._buffers: dict[str, float] = {}

    def client(self, timeout: float | None = None) -> httpx.AsyncClient:
        """An HTTP client for the server's socket."""
        transport = httpx.AsyncHTTPTransport(uds=str(self.spec.socket_path))
        return httpx.AsyncClient(transport=transport, base_url="http://llama-server",
                                 timeout=httpx.Timeout(timeout, connect=5.0))

    def _task_name(self) -> str:
        return f"server:{self.spec.name}"

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """True once the server serves (False after *timeout* seconds)."""
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def _saw(self, line: str) -> None:
        found = _OFFLOADED.search(line)
        if found:
            self._offloaded = (int(found.group(1)), int(found.group(2)))
        buffer = _BUFFER.search(line)
        if buffer:
            self._buffers[buffer.group(1)] = self._buffers.get(buffer.group(1), 0.0) + float(buffer.group(2))

    def _last_error(self) -> str:
        for line in reversed(self.log_tail):
            if re.search(r"\berror\b|failed|exception", line, re.I):
                return line.strip()
        return self.log_tail[-1].strip() if self.log_tail else ""

    async def _run_once(self) -> None:
        sock = self.spec.socket_path
        sock.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            sock.unlink()
        self._offloaded, self._buffers = None, {}
        proc, reader = await self._launch(self.spec.argv())
        try:
            if not await self._wait_healthy(proc):
                return
            await self._became_ready(proc)
            pinger = asyncio.get_running_loop().create_task(self._ping_loop(proc))
            try:
                code = await proc.wait()
            finally:
                pinger.cancel()
            if not self._stopping:
                what = "was killed (out of memory?)" if code == -signal.SIGKILL else f"exited with status {code}"
                self.error = f"llama-server {what}"
                log.error("model %s: llama-server (pid %d) %s", self.spec.name, proc.pid, what)
        finally:
            await self._reap(proc, reader)

    async def _wait_healthy(self, proc: asyncio.subprocess.Process) -> bool:
        deadline = time.monotonic() + self.load_timeout
        async with self.client(5.0) as client:
            while True:
                if proc.returncode is not None:
                    await asyncio.sleep(0.1)  # let the log reader catch the last lines
                    self.error = self._last_error() or f"llama-server exited with status {proc.returncode} while loading"
                    self.state = "failed"
                    log.error("model %s: %s", self.spec.name, self.error)
                    return False
                if time.monotonic() >= deadline:
                    self.error = f"did not load within {self.load_timeout:.0f}s"
                    self.state = "failed"
                    await self._kill(proc)
                    return False
                with contextlib.suppress(httpx.HTTPError, OSError):
                    if (await client.get("/health")).status_code == 200:
                        return True
                await asyncio.sleep(0.1)

    async def _became_ready(self, proc: asyncio.subprocess.Process) -> None:
        props: dict[str, Any] = {}
        with contextlib.suppress(httpx.HTTPError, OSError, ValueError):
            async with self.client(10.0) as client:
                props = (await client.get("/props")).json()
        facts = gguf_facts(self.spec.model_path)
        from .. import llamacpp

        try:
            # In a child, off the event loop: the agent never loads the GPU runtimes itself.
            seen = await asyncio.to_thread(llamacpp.facts_in_subprocess)
            devices, variant = list(seen["devices"]), seen.get("cpu_variant")
        except Exception:  # the agent's own view of the devices is a nicety, never a failure
            devices, variant = [], None
        used = [n for n in self._buffers if not n.upper().startswith("CPU")]
        done, total = self._offloaded or (0, int(facts.get("n_layer") or 0) + 1)
        caps = props.get("chat_template_caps") or {}
        self.info = {
            "name": self.spec.name,
            "context_length": int(props.get("default_generation_settings", {}).get("n_ctx")
                                  or self.spec.context_per_slot()),
            "slots": int(props.get("total_slots") or self.spec.slots),
            "size_bytes": int(facts.get("size_bytes") or 0),
            "can_embed": self.spec.embedding,
            "family": facts.get("family", ""),
            "quantization": facts.get("quantization", ""),
            "chat_format": self.spec.chat_format or ("gguf" if facts.get("has_template") else "chatml"),
            "tools": bool(caps.get("supports_tools", True)) and not self.spec.embedding,
            "template_caps": caps,
            "build": props.get("build_info", ""),
            "offload": {
                # llama.cpp's own report of where the weights went, not what was asked for.
                "backend": ", ".join(used) if done and used else "cpu",
                "devices_used": used,
                "weights_mib": {k: round(v, 1) for k, v in self._buffers.items()},
                "devices": devices,
                "cpu_variant": variant,
                "layers_offloaded": done,
                "layers_total": total,
            },
        }
        self.error = None
        self.state = "ready"
        self.ready.set()
        log.info("model %s ready (llama-server pid %d, %d slots of %d tokens, %s/%s layers on %s)", self.spec.name,
                 proc.pid, self.info["slots"], self.info["context_length"], done, total,
                 self.info["offload"]["backend"])

    async def _ping_loop(self, proc: asyncio.subprocess.Process) -> None:
        # A server that is alive but no longer answers (stuck in the runtime) is killed and restarted.
        failures = 0
        async with self.client(10.0) as client:
            while proc.returncode is None:
                await asyncio.sleep(self.ping_interval)
                try:
                    ok = (await client.get("/health")).status_code in (200, 503)
                    failures = 0 if ok else failures + 1
                except (httpx.HTTPError, OSError):
                    failures += 1
                if failures >= 3:
                    log.error("model %s: llama-server does not answer /health: killing it", self.spec.name)
                    await self._kill(proc)
                    return

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after *timeout* seconds."""
        await super().stop(timeout)
        with contextlib.suppress(OSError):
            self.spec.socket_path.unlink()


_FORMAT_BY_ARCH = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma"}
"""Hearth's templates for GGUFs that carry none, by architecture (others get llama-server's ChatML)."""


def default_chat_format(facts: dict[str, Any]) -> str:
    """Hearth's template for a GGUF without one of its own (llama-server would fall back to ChatML,
    wrong for Gemma's turns); '' when the GGUF has its own."""
    if not facts or facts.get("has_template"):
        return ""
    return _FORMAT_BY_ARCH.get(str(facts.get("family")), "")
