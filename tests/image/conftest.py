"""Image-tier fixtures: the built image (HEARTH_IMAGE, from `bash image/build --profile gemma270m`) and the
qemu harness (ci/qemu.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ci"))

import qemu  # noqa: E402  (ci/qemu.py: the harness people use too)

MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"


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


@pytest.fixture(scope="session")
def harness():
    """The ci/qemu.py module."""
    return qemu

