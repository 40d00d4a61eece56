#!/usr/bin/env python3
"""Image figures: size, incremental rebuild time, and qemu start -> API ready -> first token, next to a
minimal Debian image booted the same way in the same run.

    sudo .venv/bin/python bench/image.py [--image PATH] [--profile gemma270m] [--no-rebuild]
                                         [--firmware uefi|bios] [--rounds N]

- Size: the image's apparent size (the bytes `dd` writes), and the size of the default image without
  a model when it has been built (mkosi.output/hearth.raw).
- Rebuild: touches a file under agent/ (what a developer changes) and times `bash image/build` with
  its caches warm.
- Boot: qemu start until /health answers 200 through the forwarded port (API ready, model loaded),
  then until the first streamed token of a chat completion, with a preset serving the bundled Gemma
  270M. The yardstick is bench/minimal (same kernel, boot loader, command line and initrd, nothing
  else) from qemu start to multi-user.target. Ratio = Hearth's API ready / minimal's multi-user.
  Both boots use the same accelerator (TCG on this host unless KVM really works).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "ci"))

import qemu  # noqa: E402

PRESET = """node:
  name: hearth-bench
model:
  name: gemma-3-270m-q4_k_m.gguf
  context: 1024
  chat_format: gemma
household:
  mode: create
"""


def build(profile: str) -> tuple[Path, float]:
    """Run image/build; (image path, seconds)."""
    started = time.monotonic()
    args = ["bash", str(ROOT / "image/build")] + (["--profile", profile] if profile else [])
    out = subprocess.run(args, check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1]), time.monotonic() - started


def build_minimal() -> Path:
    """Build bench/minimal with image/build's caches; the image's path."""
    cache = Path(os.environ.get("HEARTH_CACHE") or Path.home() / ".cache/hearth")
    dirs = {"--cache-dir": "cache", "--package-cache-dir": "packages", "--build-dir": "build-minimal"}
    args = []
    for flag, sub in dirs.items():
        (cache / "mkosi" / sub).mkdir(parents=True, exist_ok=True)
        args += [flag, str(cache / "mkosi" / sub)]
    subprocess.run(["mkosi", "-C", str(ROOT / "bench/minimal"), *args, "-f", "build"], check=True,
                   stdout=sys.stderr)
    return ROOT / "mkosi.output/minimal.raw"


def boot_minimal(image: Path, firmware: str) -> float:
    """Seconds from qemu start to the minimal image's multi-user.target."""
    with tempfile.TemporaryDirectory() as tmp:
        vm = qemu.VM(image, firmware=firmware, workdir=Path(tmp) / "vm", credentials={"hearth.check": "ready"})
        vm.prepare()
        with vm:
            started = time.monotonic()
            vm.wait_for(r"hearth-check: exit 0", 1800)
            ready = time.monotonic() - started
            vm.powerdown(120)
    return ready


def wait_healthy(port: int, vm: qemu.VM, timeout: float) -> None:
    """Until /health answers 200 through the forwarded port."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if vm.proc is not None and vm.proc.poll() is not None:
            raise SystemExit(f"qemu exited:\n{vm.tail(60)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"no healthy API after {timeout:.0f}s:\n{vm.tail(60)}")


def boot(image: Path, firmware: str) -> dict[str, float | str]:
    """Boot once; seconds from qemu start to API ready and to the first streamed token."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        preset = Path(tmp) / "hearth.yaml"
        preset.write_text(PRESET)
        vm = qemu.VM(image, firmware=firmware, port=port, workdir=Path(tmp) / "vm",
                     credentials={"hearth.check": "full show-key"})
        vm.prepare()
        qemu.put_preset(vm.disk, preset)
        with vm:
            started = time.monotonic()
            wait_healthy(port, vm, 1800)
            ready = time.monotonic() - started
            # The check unit prints the API key (test credential only); it also generates a token itself,
            # so the host's first token is timed from API ready, and added to it.
            match = vm.wait_for(r"hearth-check: exit (\d+)", 1800)
            if match.group(1) != b"0":
                raise SystemExit(f"check failed:\n{vm.tail(60)}")
            key = re.search(rb"hearth-check: api-key (\S+)", vm.log())
            import openai

            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                                   api_key=key.group(1).decode() if key else "none", timeout=600)
            model = client.models.list().data[0].id
            asked = time.monotonic()
            stream = client.chat.completions.create(model=model, max_tokens=8, stream=True,
                                                    messages=[{"role": "user", "content": "Hello"}])
            first = None
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.monotonic() - asked
            vm.powerdown(120)
    if first is None:
        raise SystemExit("the node streamed no token")
    return {"boot_api_ready_s": round(ready, 1), "boot_first_token_s": round(ready + first, 1),
            "first_token_after_ready_s": round(first, 2), "accel": "kvm" if qemu.kvm_works() else "tcg",
            "firmware": firmware}


def main() -> int:
    """Measure and print; the last line is JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", help="image to boot (default: build one)")
    p.add_argument("--profile", default="gemma270m")
    p.add_argument("--no-rebuild", action="store_true", help="skip the rebuild timing")
    p.add_argument("--firmware", default="uefi", choices=("uefi", "bios"))
    p.add_argument("--rounds", type=int, default=1, help="boots of each image (the medians are reported)")
    args = p.parse_args()
    result: dict[str, object] = {}
    image = Path(args.image) if args.image else None
    if not args.no_rebuild:
        if image is None:
            image, _ = build(args.profile)
        os.utime(ROOT / "agent/__init__.py")
        image, seconds = build(args.profile)
        result["rebuild_s"] = round(seconds, 1)
        print(f"incremental rebuild after an agent change: {seconds:.0f}s", file=sys.stderr)
    elif image is None:
        image, _ = build(args.profile)
    result["image"] = image.name
    result["image_bytes"] = image.stat().st_size
    plain = ROOT / "mkosi.output/hearth.raw"
    if plain.exists() and plain.resolve() != image.resolve():
        result["image_bytes_without_model"] = plain.stat().st_size
    minimal = build_minimal()
    result["minimal_image_bytes"] = minimal.stat().st_size
    boots, yard = [], []
    for i in range(args.rounds):  # alternate, so drifting host load hits both alike
        boots.append(boot(image, args.firmware))
        yard.append(boot_minimal(minimal, args.firmware))
        print(f"round {i + 1}: hearth API ready {boots[-1]['boot_api_ready_s']}s, first token "
              f"{boots[-1]['boot_first_token_s']}s; minimal multi-user {yard[-1]:.1f}s", file=sys.stderr)
    result.update(accel=boots[0]["accel"], firmware=args.firmware)
    for key in ("boot_api_ready_s", "boot_first_token_s", "first_token_after_ready_s"):
        result[key] = statistics.median(float(b[key]) for b in boots)
    result["minimal_multi_user_s"] = round(statistics.median(yard), 1)
    result["boot_ratio_vs_minimal"] = round(float(result["boot_api_ready_s"]) / result["minimal_multi_user_s"], 2)
    result["rounds"] = args.rounds
    result["load_average"] = os.getloadavg()[0]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
