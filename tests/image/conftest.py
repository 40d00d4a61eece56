"""Image-tier fixtures: the built image (HEARTH_IMAGE, from `bash image/build --profile gemma270m`) and the
qemu harness (ci/qemu.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ci"))

import qemu  # noqa: E402  (ci/qemu.py: the harness people use too)

MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
USR_TYPE = "8484680C-9521-48C6-9C11-B0720656F69E"
"""/usr of x86-64 (the image's A/B slots)."""
USR_VERITY_TYPE = "77FF5F63-E7B6-4633-ACF4-1565B864C0E6"
"""/usr verity of x86-64."""


@pytest.fixture(scope="session")
def image() -> Path:
    """The image under test; the image tests skip (with the command to run) when none was built."""
    path = os.environ.get("HEARTH_IMAGE")
    if not path:
        pytest.skip("HEARTH_IMAGE is not set: build one with 'bash image/build --profile gemma270m' "
                    "and run HEARTH_IMAGE=<its path> pytest -m image")
    if not Path(path).is_file():
        pytest.fail(f"HEARTH_IMAGE={path} does not exist")
    return Path(path)


def _integration_fixtures() -> Any:
    """tests/integration/conftest.py as a module, under the name tests/browser/pagelab.py loads it by (one
    module, not two, when both tiers run)."""
    import importlib.util

    name = "hearth_it_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "integration" / "conftest.py")
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


small_gguf = _integration_fixtures().small_gguf
"""The integration tier's generated 4-layer llama (128 wide, F32), for the Vulkan check inside the booted
image: small enough for lavapipe under TCG. The test copies it onto the stick as vulkan-check.gguf."""


@pytest.fixture(scope="session")
def harness():
    """The ci/qemu.py module."""
    return qemu



@contextmanager
def mounted(image: Path, tmp: Path) -> Iterator[list[Path]]:
    """Every mountable partition of image, mounted read-only (loop, by offset) under tmp; the first /usr slot
    (squashfs) is mounted on the root's usr/, so the root reads as the booted node sees it."""
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], check=True, capture_output=True,
                                      text=True).stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    points: list[Path] = []
    found_esp: list[Path] = []
    try:
        usr_slots = []
        inner: list[Path] = []
        for n, part in enumerate(table["partitions"], 1):
            point = tmp / f"p{n}"
            point.mkdir()
            offset = int(part["start"]) * sector
            if part["type"].upper() == USR_TYPE:
                # /usr is a slot of its own (A/B), mounted below the root once that is found.
                if part.get("name", "").startswith("hearth_"):
                    usr_slots.append(part)
                continue
            if part["type"].upper() == ESP_TYPE:
                # FAT through mtools: no mount needed (some sandboxes cannot mount vfat).
                subprocess.run(["mcopy", "-s", "-n", "-i", f"{image}@@{offset}", "::*", str(point)], check=True,
                               capture_output=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
                found_esp.append(point)
                continue
            opts = f"ro,loop,offset={offset},sizelimit={int(part['size']) * sector}"
            if subprocess.run(["mount", "-o", opts, str(image), str(point)], capture_output=True).returncode == 0:
                points.append(point)
        for part in usr_slots[:1]:
            root = next((p for p in points if (p / "etc").is_dir() and (p / "usr").is_dir()), None)
            opts = f"ro,loop,offset={int(part['start']) * sector},sizelimit={int(part['size']) * sector}"
            if root is not None and subprocess.run(["mount", "-o", opts, str(image), str(root / "usr")],
                                                   capture_output=True).returncode == 0:
                inner.append(root / "usr")
        yield points + found_esp
    finally:
        for point in inner + points:
            subprocess.run(["umount", str(point)], check=False)


@pytest.fixture(scope="session")
def fs(image, tmp_path_factory):
    """The image's file systems: {'root': Path, 'var': Path, 'esp': Path}."""
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices and read-only mounts of the image)")
    tmp = tmp_path_factory.mktemp("image-fs")
    with mounted(image, tmp) as points:
        found = {}
        for p in points:
            if (p / "etc/os-release").exists() or (p / "usr/lib/os-release").exists():
                found["root"] = p
            elif (p / "lib/dpkg").exists() or (p / "lib/hearth").exists() or (p / "log").exists():
                found["var"] = p
            elif (p / "EFI").exists():
                found["esp"] = p
        assert {"root", "var", "esp"} <= set(found), f"partitions found: {found}"
        yield found


