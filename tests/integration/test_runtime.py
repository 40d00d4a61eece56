"""Hearth's llama.cpp runtime (ci/runtime) as built: one tree, every CPU variant, Vulkan and RPC backends,
llama-server and rpc-server over the same libraries, and Mesa's lavapipe as a real Vulkan device on a CPU.

lavapipe is a CPU-type Vulkan device, which ggml skips unless GGML_VK_VISIBLE_DEVICES names it: these tests
(and only these) set it, in child processes, so the rest of the suite sees this machine as it is.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from hearth import llamacpp

pytestmark = pytest.mark.integration


CACHE = Path(os.environ.get("HEARTH_CACHE") or Path.home() / ".cache" / "hearth")


def _lavapipe_env() -> dict[str, str]:
    icds = sorted(Path("/usr/share/vulkan/icd.d").glob("lvp_icd*.json"))
    if not icds:
        pytest.fail("Mesa's lavapipe is not installed (apt-get install mesa-vulkan-drivers): ci/test installs it")
    # Only lavapipe, so device 0 is it whatever other drivers are installed. lavapipe compiles every
    # compute pipeline with LLVM on first use (minutes on 2 cores): skip LLVM's optimisation passes and keep
    # Mesa's shader cache in Hearth's cache, so only the first run on a machine pays.
    return dict(os.environ, VK_ICD_FILENAMES=str(icds[0]), VK_DRIVER_FILES=str(icds[0]), GGML_VK_VISIBLE_DEVICES="0",
                GALLIVM_PERF="no_opt", MESA_SHADER_CACHE_DIR=str(CACHE / "mesa-shader-cache"))


def _devices_json(env: dict[str, str]) -> dict[str, Any]:
    run = subprocess.run([sys.executable, "-m", "hearth", "hardware", "--json"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "load_backend" not in run.stdout + run.stderr, "llama.cpp's load chatter leaked into hearth's output"
    return dict(json.loads(run.stdout))


def test_runtime_has_every_part(llama_runtime: Any) -> None:
    runtime = llamacpp.runtime_dir()
    for program in ("llama-server", "rpc-server", "llama-bench"):
        assert os.access(runtime / "bin" / program, os.X_OK), program
    variants = llamacpp.cpu_variants()
    assert {"x64", "sse42", "haswell", "skylakex", "sapphirerapids"} <= set(variants)
    assert {"CPU", "Vulkan", "RPC"} <= set(llamacpp.backend_names())
    # The servers and the bindings are one build: llama-server links the very libllama the agent loads.
    ldd = subprocess.run(["ldd", str(runtime / "bin" / "llama-server")], capture_output=True, text=True).stdout
    linked = re.search(r"libllama\.so\.0 => (\S+)", ldd)
    assert linked and Path(linked.group(1)).resolve() == (runtime / "lib" / "libllama.so.0").resolve(), ldd
    version = subprocess.run([str(runtime / "bin" / "llama-server"), "--version"], capture_output=True, text=True)
    assert re.search(r"version: \d+", version.stdout + version.stderr)


def test_chosen_cpu_variant_only_uses_what_the_kernel_enables(llama_runtime: Any) -> None:
    """The patched scorer asks the OS (XCR0, AMX permission): every variant ggml would accept needs only
    features the kernel shows in /proc/cpuinfo (Linux hides flags whose register state it does not enable)."""
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())  # type: ignore[union-attr]
    needs = {"haswell": {"avx2", "fma", "f16c", "bmi2"}, "skylakex": {"avx512f", "avx512bw", "avx512vl"},
             "icelake": {"avx512vbmi", "avx512_vnni"}, "cooperlake": {"avx512_bf16"},
             "sapphirerapids": {"amx_int8", "amx_tile"}, "zen4": {"avx512f", "avx512_bf16"}}
    code = ("import ctypes, json, sys; from hearth import llamacpp; llamacpp.load(); out = {}\n"
            "for v in llamacpp.cpu_variants():\n"
            "    lib = ctypes.CDLL(str(llamacpp.backend_dir() / f'libggml-cpu-{v}.so'))\n"
            "    out[v] = lib.ggml_backend_score()\n"
            "print(json.dumps(out))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    scores = json.loads(run.stdout.strip().splitlines()[-1])
    assert scores["x64"] > 0
    for variant, score in scores.items():
        if score > 0:
            assert needs.get(variant, set()) <= flags, f"{variant} scores {score} but needs {needs[variant] - flags}"
    chosen = llamacpp.cpu_variant()
    assert chosen and scores[chosen] == max(scores.values()), (chosen, scores)


def test_hardware_lists_the_lavapipe_device(llama_runtime: Any) -> None:
    """`hearth hardware --json` lists a Vulkan device under llama.cpp once Mesa's drivers are installed."""
    report = _devices_json(_lavapipe_env())
    devices = report["llama_cpp"]["devices"]
    vulkan = [d for d in devices if d["name"].startswith("Vulkan")]
    assert vulkan, devices
    assert "llvmpipe" in vulkan[0]["description"].lower() and vulkan[0]["memory_total"] > 0
    assert report["llama_cpp"]["gpu_offload"] is True


def test_lavapipe_matches_the_cpu_token_for_token(small_gguf: Path, llama_runtime: Any) -> None:
    """Every layer on the Vulkan device, and its top-1 token equals the CPU's at each of 32 teacher-forced
    positions (near-ties, CPU top-2 within 0.01, excepted).

    The model is a generated 4-layer llama (F32): on lavapipe, Gemma 3 270M's 262k-token output layer makes
    one 40-token evaluation take minutes, and the comparison is about the backend, not the weights."""
    from hearth.hardware.verify import verify

    verdict = verify(small_gguf, n=32, tie=0.01, prompt="the house", env=_lavapipe_env())
    print(json.dumps(verdict.__dict__))
    assert verdict.positions == 32
    assert verdict.gpu_backends and "Vulkan" in verdict.gpu_backends
    assert verdict.layers_total == 5 and verdict.layers_offloaded == verdict.layers_total
    assert "Vulkan0" in verdict.gpu_device and "llvmpipe" in verdict.gpu_device.lower()
    assert not verdict.mismatches, verdict.mismatches
    assert verdict.matched + verdict.near_ties == 32 and verdict.ok


def test_llama_server_from_the_runtime_serves_gemma(gemma_path: Path, free_port: int, llama_runtime: Any) -> None:
    """llama.cpp's own server, from the same runtime, loads Gemma on loopback and completes a prompt."""
    server = llamacpp.server_binary()
    proc = subprocess.Popen([str(server), "-m", str(gemma_path), "--host", "127.0.0.1", "--port", str(free_port),
                             "-c", "512", "-t", "2", "-np", "1", "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, GGML_VK_VISIBLE_DEVICES=""))
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (proc.stderr.read() if proc.stderr else b"").decode()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{free_port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "llama-server did not become healthy in 120 s"
            time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{free_port}/completion", timeout=60,
                       json={"prompt": "The capital of France is the city of", "n_predict": 8, "temperature": 0})
        assert r.status_code == 200 and "Paris" in r.json()["content"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
