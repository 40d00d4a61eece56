"""Background model acquisition: progress lines, retry with backoff, clean stop; the daemon's plan
(fetch the chosen catalogue model, or serve a stored one that fits for ``auto``) and its /health."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hearth import config as config_mod
from hearth import daemon
from hearth.models import catalogue
from hearth.models.errors import CatalogueError, DownloadError
from hearth.serving.acquire import Acquisition, backoff_from_env

gguf = pytest.importorskip("gguf")
MACHINES = Path(__file__).resolve().parents[1] / "fixtures" / "machines"
GIB = 1 << 30


def make_gguf(path: Path, kib: int = 64) -> Path:
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_tensor("weight", np.zeros(kib * 256, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def cfg(tmp_path: Path, name: str = "auto") -> config_mod.Config:
    return config_mod.from_dict({"state": {"dir": str(tmp_path)}, "model": {"name": name}, "mesh": {"enabled": False}})


def test_progress_line_and_ready_callback(tmp_path: Path) -> None:
    seen: list[str] = []
    served: list[Path] = []

    def fetch(config: Any, name: str, progress: Any, should_stop: Any, say: Any) -> Path:
        say("catalogue")
        progress(int(1.4 * GIB), int(4.1 * GIB), 1e6)
        seen.append(acq.line())
        return tmp_path / "m.gguf"

    async def ready(path: Path) -> None:
        served.append(path)

    acq = Acquisition(cfg(tmp_path), "qwen2.5-7b-instruct", ready, size_hint=4 * GIB, backoff=(0.01, 0.02), fetch=fetch)
    assert acq.line() == "downloading qwen2.5-7b-instruct: starting"

    async def main() -> None:
        await acq.start()

    asyncio.run(main())
    assert seen == ["downloading qwen2.5-7b-instruct: 34% (1.4 of 4.1 GiB)"]
    assert served == [tmp_path / "m.gguf"]
    assert acq.state == "done" and acq.to_dict()["via"] == "catalogue"


def test_failure_is_reported_then_retried_until_it_works(tmp_path: Path) -> None:
    calls: list[float] = []
    lines: list[str] = []

    def fetch(config: Any, name: str, progress: Any, should_stop: Any, say: Any) -> Path:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise DownloadError("cannot connect to example.org: refused", hint="check the network")
        return tmp_path / "m.gguf"

    async def ready(path: Path) -> None:
        pass

    acq = Acquisition(cfg(tmp_path), "m", ready, backoff=(0.05, 0.08), fetch=fetch)

    async def main() -> None:
        task = acq.start()
        while acq.state != "retrying":
            await asyncio.sleep(0.005)
        lines.append(acq.line())
        assert acq.to_dict()["error"].startswith("cannot connect")
        await task

    asyncio.run(main())
    assert len(calls) == 3 and acq.state == "done" and acq.error is None
    assert lines[0].startswith("download of m failed: cannot connect to example.org: refused (check the network); retrying in")
    assert calls[1] - calls[0] >= 0.05 and calls[2] - calls[1] >= 0.08  # doubled, capped at the max


def test_stop_cancels_and_ends_the_download_thread(tmp_path: Path) -> None:
    started = threading.Event()
    ended = threading.Event()

    def fetch(config: Any, name: str, progress: Any, should_stop: Any, say: Any) -> Path:
        started.set()
        while not should_stop():  # what download() does between chunks
            progress(1, 10, 1.0)
            time.sleep(0.01)
        ended.set()
        raise DownloadError("download of m stopped; run it again to resume")

    async def ready(path: Path) -> None:
        raise AssertionError("must not be served")

    acq = Acquisition(cfg(tmp_path), "m", ready, backoff=(0.01, 0.01), fetch=fetch)

    async def main() -> None:
        acq.start()
        while not started.is_set():
            await asyncio.sleep(0.005)
        assert acq.line() == "downloading m: 10% (1 B of 10 B)"
        await acq.stop()

    asyncio.run(main())  # asyncio.run waits for the worker thread: it must notice the stop
    assert ended.is_set() and acq.state == "stopped" and acq.task is not None and acq.task.cancelled()


def test_a_file_that_cannot_be_served_is_an_error_not_a_retry_loop(tmp_path: Path) -> None:
    async def ready(path: Path) -> None:
        raise RuntimeError("bad model")

    acq = Acquisition(cfg(tmp_path), "m", ready, backoff=(0.01, 0.01),
                      fetch=lambda *a: tmp_path / "m.gguf")
    asyncio.run(acq.run())
    assert acq.state == "failed" and "cannot be served: bad model" in acq.line()


def test_backoff_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEARTH_ACQUIRE_BACKOFF", raising=False)
    assert backoff_from_env() == (30.0, 600.0)
    monkeypatch.setenv("HEARTH_ACQUIRE_BACKOFF", "0.5,2")
    assert backoff_from_env() == (0.5, 2.0)
    monkeypatch.setenv("HEARTH_ACQUIRE_BACKOFF", "5")
    assert backoff_from_env() == (5.0, 600.0)
    monkeypatch.setenv("HEARTH_ACQUIRE_BACKOFF", "soon")
    assert backoff_from_env() == (30.0, 600.0)


# --- the catalogue override -------------------------------------------------------------------------------

ENTRY = """models:
  - name: tiny
    display_name: Tiny
    family: test
    parameters_b: 0.001
    quantization: F32
    file: tiny.gguf
    size_bytes: 300000
    sources: [{source}]
    licence: test
    context_length: 256
    n_layers: 1
    n_kv_heads: 1
    head_dim: 16
    embedding_length: 16
    sha256_pending: true
"""


def test_hearth_catalogue_env_replaces_the_shipped_catalogue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(ENTRY.format(source="http://127.0.0.1:8080/tiny.gguf"))
    monkeypatch.setenv("HEARTH_CATALOGUE", str(path))
    assert catalogue.load().names() == ["tiny"]
    monkeypatch.delenv("HEARTH_CATALOGUE")
    assert "tiny" not in catalogue.load().names()


@pytest.mark.parametrize("source", ["http://example.org/tiny.gguf", "http://127.0.0.1.example.org/x.gguf",
                                    "ftp://127.0.0.1/x.gguf"])
def test_plain_http_is_for_loopback_only(source: str) -> None:
    with pytest.raises(CatalogueError, match="sources must be"):
        catalogue.parse(ENTRY.format(source=source))


# --- the daemon's plan -----------------------------------------------------------------------------------------


def test_named_catalogue_model_missing_from_the_store_is_planned_for_download(tmp_path: Path) -> None:
    plan = daemon.plan_download(cfg(tmp_path, "qwen2.5-7b-instruct"))
    assert plan is not None and plan[0] == "qwen2.5-7b-instruct" and plan[2] and plan[2] > GIB


def test_auto_plans_the_profile_choice_when_the_store_is_empty(tmp_path: Path) -> None:
    from hearth.hardware import probe

    report = probe(MACHINES / "minipc-n100")
    config = cfg(tmp_path)
    plan = daemon.plan_download(config, report)
    assert plan is not None and plan[0] == "gemma3-4b" and plan[1]["context"] == 8192
    assert daemon.fallback_from_store(config, report) is None


def test_auto_serves_a_stored_model_that_fits_rather_than_nothing(tmp_path: Path) -> None:
    from hearth.hardware import probe

    report = probe(MACHINES / "minipc-n100")
    config = cfg(tmp_path)
    config.models_dir.mkdir(parents=True)
    make_gguf(config.models_dir / "small.gguf")
    assert daemon.plan_download(config, report) is not None  # the profile still prefers gemma3-4b
    fallback = daemon.fallback_from_store(config, report)
    assert fallback is not None
    name, path, options = fallback
    assert (name, path) == ("small", config.models_dir / "small.gguf") and options["threads"] >= 1


def test_health_shows_the_download_and_its_error(tmp_path: Path) -> None:
    node = daemon.Node(cfg(tmp_path))
    node.pending = ("qwen2.5-7b-instruct", {}, 4 * GIB)
    h = node.health()
    assert h["status"] == "loading" and h["warnings"] == ["downloading qwen2.5-7b-instruct: starting"]

    async def ready(path: Path) -> None:
        pass

    acq = Acquisition(node.config, "qwen2.5-7b-instruct", ready, size_hint=int(4.1 * GIB))
    node.acquisition = acq
    acq.state = "downloading"
    acq._progress(int(1.4 * GIB), None, 1.0)
    h = node.health()
    assert h["status"] == "loading" and "downloading qwen2.5-7b-instruct: 34% (1.4 of 4.1 GiB)" in h["warnings"]
    assert h["download"]["bytes"] == int(1.4 * GIB)
    acq._failed("not enough space: needs 2.7 GiB (free some space)", 30)
    h = node.health()
    assert h["status"] == "error" and "not enough space" in h["warnings"][-1]
    acq.state = "done"
    assert node.health()["status"] == "ready" and "download" not in node.health()


def test_systemd_status_line_mirrors_the_download(tmp_path: Path) -> None:
    agent = daemon.Agent(cfg(tmp_path))
    sent: list[str] = []
    agent.notify = lambda *fields: sent.extend(fields)  # type: ignore[assignment,method-assign]

    async def ready(path: Path) -> None:
        pass

    acq = Acquisition(agent.config, "gemma3-4b", ready, size_hint=4 * GIB)
    acq.state = "downloading"
    agent.node.acquisition = acq

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(agent._report_readiness())
        while not sent:
            await asyncio.sleep(0.01)
        acq._progress(GIB, None, 1.0)
        while len(sent) < 2:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(main())
    assert sent == ["STATUS=loading: downloading gemma3-4b: starting",
                    "STATUS=loading: downloading gemma3-4b: 25% (1.0 of 4.0 GiB)"]


def test_node_plans_a_fetch_or_serves_a_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hearth.hardware import probe
    from hearth.models.errors import ModelNotInStore

    served: list[tuple[str, Path]] = []
    monkeypatch.setattr(daemon.Node, "_serve", lambda self, name, path, options: served.append((name, path)))
    missing = ModelNotInStore("model 'gemma3-4b' is not in the store yet", hint="hearth models pull gemma3-4b")

    node = daemon.Node(cfg(tmp_path / "empty"))
    node.report = probe(MACHINES / "minipc-n100")
    assert asyncio.run(node._plan_fetch(missing)) is True
    assert node.pending is not None and node.pending[0] == "gemma3-4b" and not served
    assert node.health()["status"] == "loading"

    node = daemon.Node(cfg(tmp_path / "some"))
    node.report = probe(MACHINES / "minipc-n100")
    node.config.models_dir.mkdir(parents=True)
    make_gguf(node.config.models_dir / "small.gguf")
    assert asyncio.run(node._plan_fetch(missing)) is True
    # The stored model stands in, and the profile's choice is still fetched.
    assert node.pending is not None and node.pending[0] == "gemma3-4b"
    assert served == [("small", node.config.models_dir / "small.gguf")]
    assert node.warnings == ["serving small from the store until gemma3-4b has arrived"]
    assert node.stand_in == ("small", node.warnings[0])

    # When the chosen file is in: plenty of memory keeps the stand-in until the new model has loaded;
    # too little stops it first.
    incoming = node.config.models_dir / "small.gguf"
    monkeypatch.setattr(daemon, "_available_memory", lambda: 64 << 30)
    assert asyncio.run(node.retire_stand_in(incoming)) is False and node.stand_in is not None
    monkeypatch.setattr(daemon, "_available_memory", lambda: 0)
    assert asyncio.run(node.retire_stand_in(incoming)) is True
    assert node.stand_in is None and node.warnings == []

    other = daemon.Node(cfg(tmp_path / "x"))
    assert asyncio.run(other._plan_fetch(daemon.StartupError("port taken"))) is False
