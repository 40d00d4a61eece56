"""Fixtures for the namespace tests; the machinery is in meshlab.py (shared with bench/mesh.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from meshlab import Lan, need_netns


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    """A fresh bridge for the module's namespaces, always removed."""
    need_netns()
    net = Lan()
    try:
        yield net
    finally:
        net.close()
