#!/usr/bin/env python3
"""Image figures: size, incremental rebuild time, and qemu start -> API ready -> first token.

    sudo python3 bench/image.py [--image PATH] [--profile gemma270m] [--no-rebuild] [--firmware uefi|bios]

Rebuild: touches hearth-agent.service (an image-only change) and times `bash image/build` with its
caches warm. Boot: boots the image with a preset serving the bundled Gemma 270M and the check
credential, waits for the check unit's verdict (API ready), then times the first streamed token. A
minimal Debian image is not built here; boot figures are TCG on this host unless KVM really works.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
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
            match = vm.wait_for(r"hearth-check: exit (\d+)", 1800)
            ready = time.monotonic() - started
            if match.group(1) != b"0":
                raise SystemExit(f"check failed:\n{vm.tail(60)}")
            key = re.search(rb"hearth-check: api-key (\S+)", vm.log())
            import openai

            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                                   api_key=key.group(1).decode() if key else "none", timeout=600)
            model = client.models.list().data[0].id
            stream = client.chat.completions.create(model=model, max_tokens=8, stream=True,
                                                    messages=[{"role": "user", "content": "Hello"}])
            first = None
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.monotonic() - started
            vm.powerdown(120)
    return {"boot_api_ready_s": round(ready, 1), "boot_first_token_s": round(first or float("nan"), 1),
            "accel": "kvm" if qemu.kvm_works() else "tcg", "firmware": firmware}


def main() -> int:
    """Measure and print; the last line is JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", help="image to boot (default: build one)")
    p.add_argument("--profile", default="gemma270m")
    p.add_argument("--no-rebuild", action="store_true", help="skip the rebuild timing")
    p.add_argument("--firmware", default="uefi", choices=("uefi", "bios"))
    args = p.parse_args()
    result: dict[str, object] = {}
    image = Path(args.image) if args.image else None
    if not args.no_rebuild:
        if image is None:
            image, _ = build(args.profile)
        os.utime(ROOT / "mkosi.extra/usr/lib/systemd/system/hearth-agent.service")
        image, seconds = build(args.profile)
        result["rebuild_s"] = round(seconds, 1)
        print(f"incremental rebuild after a service-file change: {seconds:.0f}s", file=sys.stderr)
    elif image is None:
        image, _ = build(args.profile)
    result["image_bytes"] = image.stat().st_size
    result.update(boot(image, args.firmware))
    result["boot_ratio_vs_minimal"] = None  # no minimal image is booted by this script (see docstring)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
