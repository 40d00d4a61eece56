"""The browser tier: Debian's chromium, headless, driven by Playwright for Python, against real agents.

Playwright's own browser builds are never downloaded: ``executable_path`` points at the system chromium
(``apt-get install chromium``; ci/test installs it for this tier). The agents are the integration tier's
(``agent_factory`` starts the real ``hearth agent``); screenshots go to ``out/page/``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from pagelab import CHROMIUM, DESKTOP, PHONE, integration

agent_factory = integration.agent_factory
llama_runtime = integration.llama_runtime


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless chromium (the system's), for one test module.

    Not for the whole session: Playwright's sync API keeps an event loop running in this thread while it is
    open, and every later test that calls asyncio.run() (the integration tier, run in the same pytest
    session by ci/test) would fail with "cannot be called from a running event loop".
    """
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.is_file():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium; ci/test does)")
    args = ["--no-sandbox"] if os.geteuid() == 0 else []  # chromium refuses its sandbox as root
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=args, headless=True)
        yield b
        b.close()


@pytest.fixture
def desktop(browser: Any) -> Iterator[Any]:
    """A fresh browser context at desktop width (its own cookies and storage)."""
    ctx = browser.new_context(viewport=DESKTOP)
    ctx.set_default_timeout(30_000)
    yield ctx
    ctx.close()


@pytest.fixture
def phone(browser: Any) -> Iterator[Any]:
    """A fresh context the size of a phone, with touch."""
    ctx = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    ctx.set_default_timeout(30_000)
    yield ctx
    ctx.close()
