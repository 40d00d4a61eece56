"""Helpers of the browser tier (imported by its tests and its conftest): the system chromium, screenshots,
signing in through the page, an agent's admin password, and the integration tier's agent machinery."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "out" / "page"
CHROMIUM = Path(os.environ.get("HEARTH_CHROMIUM", "/usr/lib/chromium/chromium"))
"""Debian's chromium binary (/usr/bin/chromium is a shell wrapper around it)."""
PASSWORD = "ember and oak 42"
DESKTOP = {"width": 1280, "height": 820}
PHONE = {"width": 390, "height": 844}


def _load(name: str, path: Path) -> Any:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


integration = _load("hearth_it_conftest", ROOT / "tests/integration/conftest.py")
make_tiny_gguf = integration.make_tiny_gguf
meshlab = _load("meshlab", ROOT / "tests/netns/meshlab.py")


def set_password(state_dir: Path, password: str = PASSWORD) -> None:
    """Give an agent an admin password, as the wizard's setup step does."""
    from hearth.page import signin
    from hearth.setup import password as pw

    signin.store_password_hash(state_dir, pw.sha512_crypt(password))


def shot(page: Any, name: str) -> Path:
    """Save a screenshot under out/page/."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def sign_in(page: Any, password: str = PASSWORD) -> None:
    """Sign in through the page's own form."""
    page.wait_for_selector("#signin-form", state="visible")
    page.fill("#password", password)
    page.click("#signin-form button[type=submit]")


def wait_until(page: Any, expression: str, timeout: float = 30.0) -> Any:
    """Poll a JavaScript expression until it is truthy; its value. (Playwright's wait_for_function compiles its
    predicate with eval, which the page's Content-Security-Policy rightly forbids.)"""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(f"() => ({expression})")
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s: {expression}")
        page.wait_for_timeout(50)
