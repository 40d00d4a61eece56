"""Models and keys in the browser: the catalogue with what fits and why, pulling a model from a loopback
server with progress shown, removing it, and an API key created (shown once) that really works.

The page runs on the node itself (loopback, ``api.open_loopback`` on by default), so no sign-in: the API's
rule for loopback holds for the page too.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pagelab import ROOT, make_tiny_gguf, shot, wait_until


def _server_module() -> Any:
    name = "hearth_it_fetches"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests/integration/test_agent_fetches_model.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def loopback_catalogue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A one-entry catalogue ('tiny') served slowly by a loopback HTTP server, so progress can be watched."""
    fetches = _server_module()
    data = make_tiny_gguf(tmp_path / "tiny-model.gguf", n_embd=256, n_ff=512).read_bytes()
    server = fetches.Server(data, fetches._free_port(), delay=0.05)
    fetches.write_catalogue(tmp_path / "models.yaml", data, server.port, display_name="Tiny test model")
    monkeypatch.setenv("HEARTH_CATALOGUE", str(tmp_path / "models.yaml"))
    server.start()
    yield server
    server.stop()


def test_pull_a_model_with_progress_then_use_it_with_a_new_key(loopback_catalogue: Any, agent_factory: Any,
                                                               desktop: Any, llama_runtime: Any) -> None:
    agent = agent_factory("none")
    page = desktop.new_page()
    page.goto(agent.url + "/")
    page.click("#tabs button[data-tab=models]")
    row = page.locator("#catalogue tr[data-model=tiny]")
    row.wait_for()
    why = row.locator("td.why").inner_text()
    assert why.startswith("✓") and "needs" in why, f"the catalogue says whether it fits, and why: {why!r}"
    assert row.locator("button", has_text="Pull").is_enabled()

    row.locator("button", has_text="Pull").click()
    progress = page.locator("#model-downloads .download[data-model=tiny][data-state=running]")
    progress.wait_for()
    seen: set[str] = set()
    while progress.count() and len(seen) < 3:
        line = progress.first.inner_text()
        match = re.search(r"\((\d+)%\)", line)
        if match:
            seen.add(match.group(1))
            if len(seen) == 2:
                shot(page, "models-pull-desktop")
        page.wait_for_timeout(100)
    assert len(seen) >= 2, f"the pull showed its progress: {seen}"
    wait_until(page, "document.querySelector('#catalogue tr[data-model=tiny]')?.innerText.includes('serving')",
                           timeout=120)
    assert loopback_catalogue.ranges, "the model came from the loopback server"

    # A key made on the page is shown once, works against the API, and the lines to paste name it.
    page.fill("#key-name", "laptop")
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#new-key-value")
    key = page.inner_text("#new-key-value").strip()
    assert key.startswith("hearth-")
    lines = page.inner_text("#env-lines")
    assert f"OPENAI_BASE_URL={agent.url}/v1" in lines and f"OPENAI_API_KEY={key}" in lines
    assert key not in page.inner_text("#keys"), "listed keys are masked"
    r = httpx.get(agent.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert r.status_code == 200 and any(m["id"] == "tiny" for m in r.json()["data"])
    page.on("dialog", lambda d: d.accept())
    page.locator("#keys li[data-key=laptop] button").click()
    wait_until(page, "!document.querySelector('#keys li[data-key=laptop]')")
    store = agent.state_dir / "api-keys"
    assert key not in store.read_text(), "revoked on the node"

    # The loaded model cannot be removed from under itself; the button says so by being off.
    assert page.locator("#catalogue tr[data-model=tiny] button", has_text="Remove").is_disabled()


def test_remove_a_stored_model(loopback_catalogue: Any, agent_factory: Any, desktop: Any, tmp_path: Path) -> None:
    agent = agent_factory("none")
    models = agent.state_dir / "models"
    models.mkdir(exist_ok=True)
    (models / "tiny-model.gguf").write_bytes(make_tiny_gguf(tmp_path / "t.gguf").read_bytes())
    page = desktop.new_page()
    page.on("dialog", lambda d: d.accept())
    page.goto(agent.url + "/")
    page.click("#tabs button[data-tab=models]")
    row = page.locator("#catalogue tr[data-model=tiny]")
    row.locator("button", has_text="Remove").click()
    row.locator("button", has_text="Pull").wait_for()
    assert not (models / "tiny-model.gguf").exists()
