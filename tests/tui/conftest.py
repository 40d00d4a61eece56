"""Fixtures for the wizard's Pilot and snapshot tests: a temporary root and deterministic services."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fakes import FakeServices


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An offline root to set up: machine-id, passwd, group, shadow."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "machine-id").write_text("7f3a19c7c4c5404aaa1f6d2a48adfda4\n")
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\nsudo:x:27:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    return tmp_path


@pytest.fixture
def services(root: Path) -> FakeServices:
    """Fake hardware (RTX 3060), network (one cable, one Wi-Fi card), no peer unless a test sets one."""
    return FakeServices(root)
