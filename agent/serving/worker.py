"""A model worker: one process that loads one GGUF model and serves it over a Unix socket.

Run as ``python -m hearth.serving.worker --model PATH --socket PATH [--context N --threads N ...]``.
The agent starts one per model (see pool.py), so a crash or an out-of-memory kill here never takes the
agent down. When the model is loaded and the socket listens, the worker prints one JSON line to stdout,
``{"ready": {...model facts...}}`` (or ``{"error": "..."}`` and exits 1).

The protocol is one connection per request and JSON lines, kept tiny because it sits on the per-token
hot path:

- the agent sends one line: ``{"op": "generate", "request": {...GenerationRequest.to_json()...}}``,
  ``{"op": "embed", "inputs": [...]}``, ``{"op": "info"}`` or ``{"op": "ping"}``;
- for ``generate`` the worker answers ``{"t": "text"}`` per piece and ends with
  ``{"done": ["stop"|"length"|"cancelled", prompt_tokens, completion_tokens]}``;
- any failure is ``{"error": "message", "status": 400, "hint": "..."}``.

Closing the connection (or sending any line) cancels a generation within one token.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from .engine import Engine, LoadOptions
from .types import Finished, GenerationRequest, UpstreamError

log = logging.getLogger("hearth.serving.worker")

_dumps = json.JSONEncoder(ensure_ascii=False).encode


class Worker:
    """Serves one Engine on a listening Unix socket; generation is serialised by a lock."""

    def __init__(self, engine: Engine, sock: socket.socket) -> None:
        self.engine = engine
        self.sock = sock
        self._model_lock = threading.Lock()

    def serve_forever(self) -> None:
        """Accept connections until the process is told to stop; each gets its own thread."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                line = _read_line(conn)
                if not line:
                    return
                try:
                    msg = json.loads(line)
                    op = msg.get("op")
                except (ValueError, AttributeError):
                    _send(conn, {"error": "the worker got a line that is not a JSON object", "status": 500})
                    return
                if op == "ping":
                    _send(conn, {"ok": True})
                elif op == "info":
                    _send(conn, {"info": self.engine.info()})
                elif op == "generate":
                    self._generate(conn, msg.get("request") or {})
                elif op == "embed":
                    self._embed(conn, msg.get("inputs") or [])
                else:
                    _send(conn, {"error": f"unknown op {op!r}", "status": 500})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the agent went away: nothing to answer

    def _generate(self, conn: socket.socket, data: dict[str, Any]) -> None:
        try:
            request = GenerationRequest.from_json(data)
        except (TypeError, ValueError) as e:
            _send(conn, {"error": f"bad request: {e}", "status": 400})
            return
        poller = select.poll()
        poller.register(conn, select.POLLIN | select.POLLHUP | select.POLLERR)

        def cancelled() -> bool:
            # Any event on the socket means the agent closed it or sent "cancel": stop either way.
            return bool(poller.poll(0))

        sendall = conn.sendall
        with self._model_lock:
            try:
                for event in self.engine.stream(request, cancelled):
                    if isinstance(event, Finished):
                        sendall(b'{"done":["%s",%d,%d]}\n' % (event.finish_reason.encode(),
                                                             event.prompt_tokens, event.completion_tokens))
                    else:
                        sendall(b'{"t":' + _dumps(event).encode() + b"}\n")
            except UpstreamError as e:
                _send(conn, {"error": e.message, "status": e.status, "hint": e.hint})
            except (BrokenPipeError, ConnectionResetError):
                raise
            except Exception as e:  # a runtime failure in llama.cpp: report it, keep serving
                log.exception("generation failed")
                _send(conn, {"error": f"generation failed: {e}", "status": 500})

    def _embed(self, conn: socket.socket, inputs: list[Any]) -> None:
        if not all(isinstance(x, str) for x in inputs):
            _send(conn, {"error": "inputs must be strings", "status": 400})
            return
        with self._model_lock:
            try:
                vectors, count = self.engine.embed(inputs)
            except UpstreamError as e:
                _send(conn, {"error": e.message, "status": e.status, "hint": e.hint})
                return
            except Exception as e:
                _send(conn, {"error": f"embedding failed: {e}", "status": 500})
                return
        _send(conn, {"embeddings": vectors, "prompt_tokens": count})


def _read_line(conn: socket.socket, limit: int = 64 << 20) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            break
    return bytes(buf)


def _send(conn: socket.socket, obj: dict[str, Any]) -> None:
    conn.sendall(_dumps(obj).encode() + b"\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The worker's command line (the agent builds it; people rarely run a worker by hand)."""
    p = argparse.ArgumentParser(prog="python -m hearth.serving.worker", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="GGUF file to serve")
    p.add_argument("--socket", required=True, help="Unix socket path to listen on")
    p.add_argument("--name", default="", help="model name as clients call it")
    p.add_argument("--context", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--gpu-layers", type=int, default=-1)
    p.add_argument("--chat-format", default="")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load the model, listen, announce readiness on stdout, serve until SIGTERM."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="worker %(levelname)s %(message)s")
    # Die with the agent: a worker must not outlive the process that supervises it.
    _set_parent_death_signal()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    options = LoadOptions(context=args.context, threads=args.threads, gpu_layers=args.gpu_layers,
                          chat_format=args.chat_format)
    try:
        engine = Engine.load(args.model, options, name=args.name)
    except UpstreamError as e:
        print(json.dumps({"error": e.message, "hint": e.hint}), flush=True)
        return 1
    path = Path(args.socket)
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(64)
    print(json.dumps({"ready": engine.info(), "pid": os.getpid()}), flush=True)
    Worker(engine, sock).serve_forever()
    return 0


def _set_parent_death_signal() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
