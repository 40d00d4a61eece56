"""GPU: Hearth's serving speed on a GPU against llama.cpp's own ``llama-bench`` on the same GGUF and device.

For the backend asked for (``--backend vulkan`` or ``cuda``), it runs the runtime's ``llama-bench`` (every
layer on the GPU, 128 generated tokens, 512-token prompt) and then streams 128 tokens through a real
``hearth agent`` serving the same file with every layer offloaded, and prints tokens/s for both and their
ratio. Also records the GPU's NVML facts with ``ci/record-nvml`` when ``--nvml-fixture DIR`` is given.

Run it only on a machine with the GPU: a session without one says so in its note instead of inventing
figures. ``--allow-cpu-vulkan`` lets it run on Mesa's lavapipe (a CPU Vulkan driver), to check the script
itself, never to quote.

    .venv/bin/python bench/gpu.py --model MODEL.gguf --backend vulkan|cuda [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import free_port, process, sse_stream, wait_http


def llama_bench(model: Path, env: dict[str, str], tokens: int, prompt: int, rounds: int) -> dict[str, float]:
    """llama-bench's tokens/s for generation (tg) and prompt processing (pp), every layer on the GPU."""
    from hearth import llamacpp

    run = subprocess.run([str(llamacpp.server_binary("llama-bench")), "-m", str(model), "-ngl", "99",
                          "-n", str(tokens), "-p", str(prompt), "-r", str(rounds), "-o", "json"],
                         capture_output=True, text=True, env=env, timeout=1800)
    if run.returncode != 0:
        raise SystemExit(f"llama-bench failed: {run.stderr[-2000:]}")
    rows = json.loads(run.stdout)
    out = {}
    for row in rows:
        key = "tg" if row.get("n_gen") else "pp"
        out[f"{key}_tokens_per_second"] = float(row["avg_ts"])
        out["backend"] = row.get("backends") or row.get("gpu_info", "")
    return out


def main(argv: list[str] | None = None) -> int:
    """Run llama-bench and Hearth on the same GPU and print the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--backend", choices=("vulkan", "cuda"), required=True)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--allow-cpu-vulkan", action="store_true", help="use lavapipe (checks the script; never quote it)")
    p.add_argument("--nvml-fixture", type=Path, help="also record NVML facts into this fixture folder")
    args = p.parse_args(argv)
    if args.backend == "cuda":
        os.environ["GGML_VK_VISIBLE_DEVICES"] = ""  # the CUDA device alone
    elif args.allow_cpu_vulkan:
        os.environ["GGML_VK_VISIBLE_DEVICES"] = "0"
    env = dict(os.environ)
    from hearth import llamacpp

    devices = [d for d in llamacpp.devices() if d["type"] in ("gpu", "igpu")]
    if not devices and not args.allow_cpu_vulkan:
        print(json.dumps({"error": "no GPU: llama.cpp lists none; nothing to measure"}))
        return 2
    bench = llama_bench(args.model, env, args.tokens, args.prompt, args.rounds)
    tmp = Path(tempfile.mkdtemp(prefix="hearth-gpu-"))
    port = free_port()
    (tmp / "hearth.yaml").write_text(json.dumps({
        "api": {"host": "127.0.0.1", "port": port}, "state": {"dir": str(tmp / "state")},
        "model": {"name": str(args.model), "gpu_layers": -1, "slots": 1, "context": 4096},
        "mesh": {"enabled": False}, "log": {"level": "warning"}}))
    speeds = []
    with process([sys.executable, "-m", "hearth", "--config", str(tmp / "hearth.yaml"), "agent"], tmp / "agent.log",
                 env) as agent:
        wait_http(f"http://127.0.0.1:{port}/health", agent, tmp / "agent.log", timeout=900)
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        offload = next(iter(health["models"].values()))["offload"]
        with httpx.Client(timeout=600) as client:
            body = {"model": args.model.stem, "max_tokens": args.tokens, "stream": True, "temperature": 0}
            for r in range(args.rounds + 1):
                n, first = 0, 0.0
                for _ in sse_stream(client, f"http://127.0.0.1:{port}/v1/completions",
                                    {**body, "prompt": f"Round {r}: the history of the hearth"}):
                    n += 1
                    if n == 1:
                        first = time.perf_counter()
                if r and n > 1:  # round 0 warms up
                    speeds.append((n - 1) / (time.perf_counter() - first))
    if args.nvml_fixture:
        subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "ci" / "record-nvml"),
                        str(args.nvml_fixture)], check=False)
    hearth_tps = statistics.median(speeds) if speeds else float("nan")
    summary = {"model": args.model.name, "backend": args.backend, "device": offload.get("backend"),
               "layers": f"{offload.get('layers_offloaded')}/{offload.get('layers_total')}",
               "llama_bench_tg_tokens_per_second": round(bench.get("tg_tokens_per_second", float("nan")), 2),
               "llama_bench_pp_tokens_per_second": round(bench.get("pp_tokens_per_second", float("nan")), 2),
               "hearth_tokens_per_second": round(hearth_tps, 2),
               "hearth_over_llama_bench": round(hearth_tps / bench["tg_tokens_per_second"], 4)
               if bench.get("tg_tokens_per_second") else None,
               "cpu_vulkan": bool(args.allow_cpu_vulkan)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
