"""Does the GPU compute what the CPU computes? A teacher-forced comparison of one model on both.

The CPU (ggml's CPU backend alone) greedily continues a prompt by N tokens; then the prompt and that
continuation are fed (as one batch, or with ``--batch 1`` one token at a time) once to the CPU and once
with every layer offloaded to the GPU. At every continuation position the GPU's top-1 token must equal the
CPU's, except where the CPU's two best logits are within ``tie`` of each other (a near-tie that rounding may
flip). Each side runs in its own process, so the CPU reference never sees a GPU (GGML_VK_VISIBLE_DEVICES=""
hides every Vulkan device) and a driver that crashes takes only its child down.

``python -m hearth.hardware.verify MODEL.gguf`` prints one JSON line; ``hearth hardware --verify-gpu
[MODEL]`` says it in words. Where the only Vulkan device is a CPU-type one (Mesa's lavapipe: tests, CI),
ggml skips it unless ``GGML_VK_VISIBLE_DEVICES`` names it; the tests set that, nothing else does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import HearthError

DEFAULT_PROMPT = "The history of the household hearth begins"


class VerifyFailed(HearthError):
    """One side of the comparison could not run."""


@dataclass
class Verdict:
    """The comparison's result."""

    positions: int
    matched: int
    near_ties: int
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    gpu_device: str = ""
    layers_offloaded: int = 0
    layers_total: int = 0
    gpu_backends: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every position matched or was a near-tie, and every layer ran on the GPU."""
        return not self.mismatches and self.layers_total > 0 and self.layers_offloaded == self.layers_total


_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_BUFFER = re.compile(r"load_tensors:\s+(\S+) model buffer size")


class _LoadReport:
    """What llama.cpp itself says while the model loads: layers offloaded, devices holding weights."""

    def __init__(self) -> None:
        self.offloaded: tuple[int, int] | None = None
        self.buffers: list[str] = []

    def line(self, level: int, text: str) -> None:
        """A llama.cpp log line (hearth.llamacpp.add_log_listener)."""
        found = _OFFLOADED.search(text)
        if found:
            self.offloaded = (int(found.group(1)), int(found.group(2)))
        buffer = _BUFFER.search(text)
        if buffer and buffer.group(1) not in self.buffers:
            self.buffers.append(buffer.group(1))

    def devices_used(self) -> list[str]:
        """Non-CPU buffers (Vulkan0, CUDA0...)."""
        return [b for b in self.buffers if not b.upper().startswith("CPU")]


def _child(model: str, tokens: list[int] | None, prompt: str, n: int, gpu: bool, batch: int = 256) -> dict[str, Any]:
    """In the child process: load, (on the CPU) continue the prompt, evaluate all tokens (*batch* at a time),
    report per position."""
    import numpy as np

    from .. import llamacpp

    lc = llamacpp.load()
    report = _LoadReport()
    llamacpp.add_log_listener(report.line)
    llama = lc.Llama(model_path=model, n_ctx=256, n_batch=batch, n_ubatch=batch, n_gpu_layers=-1 if gpu else 0,
                     logits_all=True, verbose=False, seed=0)
    if tokens is None:
        prompt_tokens = llama.tokenize(prompt.encode(), add_bos=True)
        continuation: list[int] = []
        for t in llama.generate(prompt_tokens, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if lc.llama_vocab_is_eog(llama._model.vocab, t) or len(continuation) >= n:
                break
            continuation.append(int(t))
        tokens = prompt_tokens + continuation
    llama.reset()
    llama.eval(tokens)
    scores = np.asarray(llama.scores[: len(tokens)])
    start = len(tokens) - n - 1
    rows = []
    for pos in range(start, len(tokens) - 1):
        # Two argmax passes, not argpartition: numpy's x86-simd-sort kernels crash under qemu's TCG (seen in
        # the image tier), and the vocabulary is one row: nothing to gain from a partition.
        row = np.array(scores[pos], dtype=np.float64)
        first = int(np.argmax(row))
        best = float(row[first])
        row[first] = -np.inf
        rows.append({"pos": pos, "top1": first, "gap": best - float(row[int(np.argmax(row))])})
    done, total = report.offloaded or (0, 0)
    return {"tokens": tokens, "rows": rows, "layers_offloaded": done, "layers_total": total,
            "devices_used": report.devices_used(), "devices": llamacpp.devices(),
            "backends": llamacpp.backend_names()}


def _run_child(args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    run = subprocess.run([sys.executable, "-m", "hearth.hardware.verify", "--child", *args], env=env,
                         capture_output=True, text=True, timeout=timeout)
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1]
        raise VerifyFailed(f"the {'GPU' if '--gpu' in args else 'CPU'} run failed: {last}")
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


def verify(model: str | Path, n: int = 32, tie: float = 0.01, prompt: str = DEFAULT_PROMPT,
           timeout: float = 1800.0, env: dict[str, str] | None = None, batch: int = 256) -> Verdict:
    """Compare the CPU and the GPU on *model* over an *n*-token continuation (see the module docstring).
    *batch* 1 feeds the tokens one at a time (the decode path: matrix-vector kernels), 256 all at once (the
    prompt path: matrix-matrix kernels)."""
    base = dict(os.environ if env is None else env)
    cpu_env = dict(base, GGML_VK_VISIBLE_DEVICES="", CUDA_VISIBLE_DEVICES="")
    common = [str(model), "--n", str(n), "--batch", str(batch)]
    cpu = _run_child([*common, "--prompt", prompt], cpu_env, timeout)
    tokens = ",".join(map(str, cpu["tokens"]))
    gpu = _run_child([*common, "--tokens", tokens, "--gpu"], base, timeout)
    verdict = Verdict(positions=len(cpu["rows"]), matched=0, near_ties=0,
                      layers_offloaded=gpu["layers_offloaded"], layers_total=gpu["layers_total"],
                      gpu_backends=[b for b in gpu["backends"] if b != "CPU"])
    described = {d["name"]: d["description"] for d in gpu["devices"]}
    verdict.gpu_device = ", ".join(f"{u} ({described.get(u, '?')})" for u in gpu["devices_used"])
    for c, g in zip(cpu["rows"], gpu["rows"], strict=True):
        if c["top1"] == g["top1"]:
            verdict.matched += 1
        elif c["gap"] < tie:
            verdict.near_ties += 1
        else:
            verdict.mismatches.append({"pos": c["pos"], "cpu": c["top1"], "gpu": g["top1"], "cpu_gap": c["gap"]})
    return verdict


def main(argv: list[str] | None = None) -> int:
    """``python -m hearth.hardware.verify MODEL``: one JSON line, exit 0 when the GPU matches the CPU."""
    p = argparse.ArgumentParser(prog="python -m hearth.hardware.verify", description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--n", type=int, default=32, help="continuation length in tokens")
    p.add_argument("--tie", type=float, default=0.01, help="CPU top-2 logit gap below which a flip is allowed")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--batch", type=int, choices=(1, 256), default=256,
                   help="tokens per evaluation: 256 (the prompt path, default) or 1 (the decode path)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gpu", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tokens", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else None
        print(json.dumps(_child(args.model, tokens, args.prompt, args.n, args.gpu, args.batch)))
        return 0
    try:
        verdict = verify(args.model, n=args.n, tie=args.tie, prompt=args.prompt, batch=args.batch)
    except HearthError as e:
        print(f"hearth: error: {e.message}", file=sys.stderr)
        return 2
    print(json.dumps(dict(asdict(verdict), ok=verdict.ok)))
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
