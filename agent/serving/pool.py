"""Model workers supervised by the agent, and the LocalUpstream that routes requests to them.

A ``WorkerProcess`` starts one worker process, waits for its ready line, pings it, and restarts it with
exponential backoff when it dies (a crash, an OOM kill, a SIGKILL): the agent itself never dies with it.
A ``LocalUpstream`` is that worker as an ``Upstream``: it bounds the queue (one running + queue_depth
waiting, beyond that ``QueueFull``), streams events over the worker's Unix socket, turns a dead
worker into a clean ``UpstreamError`` and measures tokens per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .types import (
    Event,
    Finished,
    GenerationRequest,
    ModelInfo,
    QueueFull,
    TokenChunk,
    UpstreamError,
    UpstreamLoad,
)

log = logging.getLogger(__name__)

_loads = json.loads


@dataclass
class Backoff:
    """Restart delays that double after each quick failure and reset once a worker has run a while."""

    first: float = 0.25
    limit: float = 30.0
    stable_after: float = 60.0
    """A worker that ran this long before dying counts as healthy: the next restart is immediate-ish."""
    current: float = field(default=0.0, init=False)

    def next(self, ran_for: float) -> float:
        """The delay before the next start, given how long the last worker ran."""
        if ran_for >= self.stable_after or self.current == 0.0:
            self.current = self.first
        else:
            self.current = min(self.limit, self.current * 2)
        return self.current


@dataclass
class WorkerSpec:
    """What a worker process serves and how."""

    name: str
    model_path: Path
    socket_path: Path
    context: int = 0
    threads: int = 0
    gpu_layers: int = -1
    chat_format: str = ""
    command: tuple[str, ...] = ()
    """Run this instead of the real worker, with --socket PATH appended (tests use a fake worker)."""

    def argv(self) -> list[str]:
        """The worker's command line."""
        if self.command:
            return [*self.command, "--socket", str(self.socket_path)]
        return [sys.executable, "-m", "hearth.serving.worker", "--model", str(self.model_path),
                "--socket", str(self.socket_path), "--name", self.name, "--context", str(self.context),
                "--threads", str(self.threads), "--gpu-layers", str(self.gpu_layers),
                "--chat-format", self.chat_format]


class WorkerProcess:
    """One supervised worker process: started, pinged, restarted with backoff, stopped gracefully."""

    def __init__(self, spec: WorkerSpec, load_timeout: float = 300.0, ping_interval: float = 10.0,
                 backoff: Backoff | None = None) -> None:
        self.spec = spec
        self.load_timeout = load_timeout
        self.ping_interval = ping_interval
        self.backoff = backoff or Backoff()
        self.state = "stopped"
        """'starting', 'ready', 'restarting', 'failed' (load error, retrying) or 'stopped'."""
        self.info: dict[str, Any] = {}
        self.error: str | None = None
        self.restarts = 0
        self.pid: int | None = None
        self.ready = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        """Begin supervising (returns at once; ``ready`` is set when the model is loaded)."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._supervise(), name=f"worker:{self.spec.name}")

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """True once the worker serves (False after *timeout* seconds)."""
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def _supervise(self) -> None:
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # supervision must go on whatever happened
                log.exception("worker %s: supervisor error", self.spec.name)
                self.error = str(e)
            self.ready.clear()
            if self._stopping:
                break
            delay = self.backoff.next(time.monotonic() - started)
            self.restarts += 1
            if self.state != "failed":
                self.state = "restarting"
            log.warning("worker %s: restarting in %.2fs (%s)", self.spec.name, delay, self.error or "exited")
            await asyncio.sleep(delay)

    async def _run_once(self) -> None:
        self.state = "starting" if self.restarts == 0 else self.state
        self.spec.socket_path.parent.mkdir(parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            *self.spec.argv(), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, limit=16 << 20)
        self._proc = proc
        self.pid = proc.pid
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), self.load_timeout)
        except TimeoutError:
            self.error = f"did not load within {self.load_timeout:.0f}s"
            self.state = "failed"
            await self._kill(proc)
            return
        try:
            hello = _loads(line) if line else {}
        except ValueError:
            hello = {}
        if "ready" not in hello:
            await proc.wait()
            self.error = hello.get("error") or f"exited with status {proc.returncode} while loading"
            self.state = "failed"
            log.error("worker %s: %s", self.spec.name, self.error)
            return
        self.info = hello["ready"]
        self.error = None
        self.state = "ready"
        self.ready.set()
        off = self.info.get("offload", {})
        log.info("worker %s ready (pid %d, %s, %s/%s layers offloaded, cpu %s)", self.spec.name, proc.pid,
                 ", ".join(d.get("name", "?") for d in off.get("devices", [])) or "cpu",
                 off.get("layers_offloaded"), off.get("layers_total"), off.get("cpu_variant"))
        pinger = asyncio.get_running_loop().create_task(self._ping_loop(proc))
        try:
            code = await proc.wait()
        finally:
            pinger.cancel()
        if not self._stopping:
            what = "was killed (out of memory?)" if code == -signal.SIGKILL else f"exited with status {code}"
            self.error = f"worker {what}"
            log.error("worker %s (pid %d) %s", self.spec.name, proc.pid, what)

    async def _ping_loop(self, proc: asyncio.subprocess.Process) -> None:
        # A worker that is alive but no longer answers (stuck in the runtime) is killed and restarted.
        failures = 0
        while proc.returncode is None:
            await asyncio.sleep(self.ping_interval)
            try:
                reply = await asyncio.wait_for(self.call({"op": "ping"}), 10.0)
                failures = 0 if reply.get("ok") else failures + 1
            except (OSError, TimeoutError, ValueError):
                failures += 1
            if failures >= 3:
                log.error("worker %s does not answer pings: killing it", self.spec.name)
                await self._kill(proc)
                return

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """One request/one reply exchange with the worker (ping, info, embed)."""
        reader, writer = await asyncio.open_unix_connection(str(self.spec.socket_path), limit=64 << 20)
        try:
            writer.write(json.dumps(message).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
            if not line:
                raise ConnectionResetError("the worker closed the connection")
            return _loads(line)
        finally:
            writer.close()

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker: SIGTERM, then SIGKILL after *timeout* seconds."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                await self._kill(proc)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.state = "stopped"
        self.ready.clear()
        with contextlib.suppress(OSError):
            self.spec.socket_path.unlink()


class LocalUpstream:
    """This node's worker for one model, as an Upstream (node 'local')."""

    node = "local"

    def __init__(self, worker: WorkerProcess, queue_depth: int = 8, ready_wait: float = 30.0) -> None:
        self.worker = worker
        self.model = worker.spec.name
        self.capacity = queue_depth + 1
        self.ready_wait = ready_wait
        self._queued = 0
        self._running = asyncio.Semaphore(1)
        self.tokens_per_second = 0.0
        self.requests = 0
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.errors = 0

    def load(self) -> UpstreamLoad:
        """Queue length, capacity and measured speed, for routing."""
        return UpstreamLoad(queued=self._queued, capacity=self.capacity,
                            tokens_per_second=self.tokens_per_second, loaded=self.worker.state == "ready")

    def info(self) -> ModelInfo:
        """What /v1/models says about this model."""
        i = self.worker.info
        return ModelInfo(name=self.model, nodes=("local",), loaded=self.worker.state == "ready",
                         context_length=int(i.get("context_length", 0)), size_bytes=int(i.get("size_bytes", 0)),
                         can_embed=bool(i.get("can_embed", False)), family=str(i.get("family", "")),
                         quantization=str(i.get("quantization", "")))

    def _retry_after(self) -> float:
        # About how long the requests ahead take: an honest hint for Retry-After.
        return max(1.0, round(self._queued * 256 / self.tokens_per_second)) if self.tokens_per_second else 1.0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream one generation from the worker; closing this iterator cancels it in the worker."""
        if self._queued >= self.capacity:
            raise QueueFull(self.model, retry_after=self._retry_after())
        self._queued += 1
        try:
            async with self._running:
                await self._admit_ready()
                deadline = time.monotonic() + self.ready_wait
                while True:
                    try:
                        async for event in self._stream(request):
                            yield event
                        return
                    except _WorkerGone as e:
                        # Nothing reached the client and the worker is dying or restarting: the
                        # request is as good as new, so wait for the next worker instead of failing.
                        if not e.before_first_token or time.monotonic() >= deadline or self.worker.state == "stopped":
                            raise UpstreamError(e.message, status=e.status, hint=e.hint,
                                                before_first_token=e.before_first_token, retry_after=1.0) from None
                    await asyncio.sleep(0.05)
        finally:
            self._queued -= 1

    async def _admit_ready(self) -> None:
        if not self.worker.ready.is_set():
            if self.worker.state == "failed" and self.worker.restarts > 2:
                raise UpstreamError(f"model '{self.model}' failed to load: {self.worker.error}", status=503,
                                    retry_after=5.0)
            if not await self.worker.wait_ready(self.ready_wait):
                raise UpstreamError(f"model '{self.model}' is not ready yet", status=503, retry_after=5.0)

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        self.requests += 1
        reader, writer = await self._connect()
        first = 0.0
        pieces = 0
        try:
            writer.write(b'{"op":"generate","request":' + json.dumps(request.to_json()).encode() + b"}\n")
            readline = reader.readline
            while True:
                line = await readline()
                if not line:
                    self.errors += 1
                    raise _WorkerGone(f"model '{self.model}' worker stopped during the generation", status=503,
                                        before_first_token=pieces == 0, retry_after=1.0)
                if line.startswith(b'{"t":'):
                    if not pieces:
                        first = time.perf_counter()
                    pieces += 1
                    yield TokenChunk(_loads(line)["t"])
                    continue
                msg = _loads(line)
                if "done" in msg:
                    reason, n_prompt, n_done = msg["done"]
                    self._account(n_prompt, n_done, first)
                    yield Finished(reason, n_prompt, n_done, served_by="local")
                    return
                if "error" in msg:
                    self.errors += 1
                    raise UpstreamError(msg["error"], status=int(msg.get("status") or 500), hint=msg.get("hint"),
                                        before_first_token=pieces == 0)
        except ConnectionError as e:
            self.errors += 1
            raise _WorkerGone(f"model '{self.model}' worker failed: {e}", status=503,
                              before_first_token=pieces == 0) from None
        except (ValueError, TypeError, KeyError) as e:
            self.errors += 1
            raise UpstreamError(f"model '{self.model}' worker answered garbage: {e}", status=502,
                                before_first_token=pieces == 0) from None
        finally:
            writer.close()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        # A worker that just died may still look ready until its supervisor notices (milliseconds):
        # keep trying until the restarted one listens, up to ready_wait.
        deadline = time.monotonic() + self.ready_wait
        while True:
            try:
                return await asyncio.open_unix_connection(str(self.worker.spec.socket_path), limit=16 << 20)
            except OSError as e:
                if time.monotonic() >= deadline or self.worker.state == "stopped":
                    self.errors += 1
                    raise UpstreamError(f"model '{self.model}' worker is not reachable: {e}", status=503,
                                        retry_after=1.0) from None
            await asyncio.sleep(0.05)
            await self.worker.wait_ready(max(0.0, deadline - time.monotonic()))

    def _account(self, n_prompt: int, n_done: int, first: float) -> None:
        self.prompt_tokens += n_prompt
        self.tokens_generated += n_done
        if n_done > 4 and first:
            speed = (n_done - 1) / max(1e-6, time.perf_counter() - first)
            self.tokens_per_second = speed if not self.tokens_per_second else 0.7 * self.tokens_per_second + 0.3 * speed

    async def embed(self, model: str, inputs: list[str]) -> tuple[list[list[float]], int]:
        """Embeddings from the worker; UpstreamError(400) when the model cannot embed."""
        if self._queued >= self.capacity:
            raise QueueFull(self.model, retry_after=self._retry_after())
        self._queued += 1
        try:
            async with self._running:
                await self._admit_ready()
                try:
                    reply = await self.worker.call({"op": "embed", "inputs": list(inputs)})
                except (OSError, ValueError) as e:
                    raise UpstreamError(f"model '{self.model}' worker failed: {e}", status=503) from None
        finally:
            self._queued -= 1
        if "error" in reply:
            raise UpstreamError(reply["error"], status=int(reply.get("status") or 500), hint=reply.get("hint"))
        return reply["embeddings"], int(reply["prompt_tokens"])


class _WorkerGone(UpstreamError):
    """The worker's connection broke (it died or is restarting)."""


class Pool:
    """Every local worker of this node, by model name."""

    def __init__(self, run_dir: Path, queue_depth: int = 8) -> None:
        self.run_dir = run_dir
        self.queue_depth = queue_depth
        self.upstreams: dict[str, LocalUpstream] = {}

    def add(self, name: str, model_path: Path, **options: Any) -> LocalUpstream:
        """Start supervising a worker for *model_path* served as *name*."""
        spec = WorkerSpec(name=name, model_path=Path(model_path), socket_path=self.run_dir / f"{_safe(name)}.sock",
                          **options)
        worker = WorkerProcess(spec)
        upstream = LocalUpstream(worker, queue_depth=self.queue_depth)
        self.upstreams[name] = upstream
        worker.start()
        return upstream

    async def remove(self, name: str, timeout: float = 5.0) -> None:
        """Stop serving *name*: its worker is stopped and forgotten (the router must drop it first)."""
        upstream = self.upstreams.pop(name, None)
        if upstream is not None:
            await upstream.worker.stop(timeout)

    def workers(self) -> Sequence[WorkerProcess]:
        """The supervised workers."""
        return [u.worker for u in self.upstreams.values()]

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop every worker (in parallel)."""
        await asyncio.gather(*(w.stop(timeout) for w in self.workers()), return_exceptions=True)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80] or "model"
