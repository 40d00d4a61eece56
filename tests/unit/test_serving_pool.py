"""Worker supervision and LocalUpstream against a fake worker process that speaks the worker protocol.

The fake needs no model: it answers like hearth.serving.worker (ready line, JSON lines per piece) so
these tests cover restart with backoff, a worker killed mid-stream, queue bounds and cancellation fast.
The same behaviours with the real model are in tests/integration/test_worker.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from hearth.serving.pool import Backoff, LocalUpstream, WorkerProcess, WorkerSpec
from hearth.serving.types import Finished, GenerationRequest, QueueFull, TokenChunk, UpstreamError

FAKE_WORKER = textwrap.dedent(r'''
    import json, os, socket, sys, threading, time
    sock_path = sys.argv[sys.argv.index("--socket") + 1]
    log = os.environ.get("FAKE_LOG")
    if os.environ.get("FAKE_FAIL_LOAD"):
        print(json.dumps({"error": "cannot load model: bad file"}), flush=True)
        sys.exit(1)
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    s = socket.socket(socket.AF_UNIX); s.bind(sock_path); s.listen(16)
    print(json.dumps({"ready": {"context_length": 128, "size_bytes": 1}}), flush=True)
    delay = float(os.environ.get("FAKE_DELAY", "0.01"))
    def handle(c):
        f = c.makefile("rb")
        msg = json.loads(f.readline())
        if msg["op"] == "ping":
            c.sendall(b'{"ok":true}\n'); c.close(); return
        n = msg["request"].get("max_tokens") or 5
        c.setblocking(True)
        for i in range(n):
            try:
                c.sendall(json.dumps({"t": f"tok{i} "}).encode() + b"\n")
            except OSError:
                if log:
                    open(log, "a").write(f"cancelled at {i}\n")
                return
            time.sleep(delay)
        c.sendall(json.dumps({"done": ["length", 3, n]}).encode() + b"\n")
        c.close()
    while True:
        conn, _ = s.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()
''')


@pytest.fixture
def fake_spec(tmp_path: Path) -> WorkerSpec:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    return WorkerSpec(name="m", model_path=tmp_path / "m.gguf", socket_path=tmp_path / "run" / "m.sock",
                      command=(sys.executable, str(script)))


def req(max_tokens: int = 5) -> GenerationRequest:
    return GenerationRequest(model="m", kind="completion", prompt="hi", max_tokens=max_tokens)


def test_backoff_doubles_then_resets_after_a_stable_run() -> None:
    b = Backoff(first=0.5, limit=4.0, stable_after=60.0)
    assert [b.next(1.0) for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert b.next(61.0) == 0.5


async def test_generate_streams_and_counts(fake_spec: WorkerSpec) -> None:
    worker = WorkerProcess(fake_spec)
    worker.start()
    try:
        up = LocalUpstream(worker, queue_depth=2)
        events = [e async for e in up.generate(req(6))]
        assert "".join(e.text for e in events if isinstance(e, TokenChunk)) == "".join(f"tok{i} " for i in range(6))
        assert events[-1] == Finished("length", 3, 6, served_by="local")
        assert up.load().loaded and up.load().queued == 0 and up.tokens_per_second > 0
        assert up.info().context_length == 128
    finally:
        await worker.stop()
    assert worker.state == "stopped" and not fake_spec.socket_path.exists()


async def test_worker_killed_mid_stream_gives_clean_error_then_recovers(fake_spec: WorkerSpec) -> None:
    worker = WorkerProcess(fake_spec, backoff=Backoff(first=0.05))
    worker.start()
    try:
        up = LocalUpstream(worker)
        assert await worker.wait_ready(10)
        pid = worker.pid
        got = []
        with pytest.raises(UpstreamError) as info:
            async for e in up.generate(req(1000)):
                got.append(e)
                if len(got) == 3:
                    assert pid is not None
                    os.kill(pid, signal.SIGKILL)
        assert info.value.before_first_token is False and info.value.status == 503
        # The next request waits for the restarted worker and succeeds.
        events = [e async for e in up.generate(req(3))]
        assert isinstance(events[-1], Finished) and worker.pid != pid and worker.restarts == 1
        assert "killed" in (worker.error or "") or worker.error is None
    finally:
        await worker.stop()


async def test_queue_bound_raises_queue_full(fake_spec: WorkerSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_DELAY", "0.05")
    worker = WorkerProcess(fake_spec)
    worker.start()
    try:
        up = LocalUpstream(worker, queue_depth=1)  # one running + one waiting
        assert await worker.wait_ready(10)
        running = up.generate(req(20))
        waiting = up.generate(req(2))
        first = await running.__anext__()
        assert isinstance(first, TokenChunk)
        waiting_task = asyncio.ensure_future(waiting.__anext__())
        while up.load().queued < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as info:
            await up.generate(req(1)).__anext__()
        assert info.value.status == 429 and info.value.retry_after and info.value.retry_after >= 1
        await running.aclose()  # type: ignore[attr-defined]
        assert isinstance(await waiting_task, TokenChunk)
        await waiting.aclose()  # type: ignore[attr-defined]
        assert up.load().queued == 0
    finally:
        await worker.stop()


async def test_closing_the_stream_cancels_in_the_worker(fake_spec: WorkerSpec, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "cancel.log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    worker = WorkerProcess(fake_spec)
    worker.start()
    try:
        up = LocalUpstream(worker)
        stream = up.generate(req(100000))
        for _ in range(3):
            await stream.__anext__()
        await stream.aclose()  # type: ignore[attr-defined]
        for _ in range(200):
            if log.exists():
                break
            await asyncio.sleep(0.02)
        assert log.read_text().startswith("cancelled at ")
        assert int(log.read_text().split()[-1]) < 100
    finally:
        await worker.stop()


async def test_load_failure_is_retried_and_reported(fake_spec: WorkerSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_FAIL_LOAD", "1")
    worker = WorkerProcess(fake_spec, backoff=Backoff(first=0.01, limit=0.02))
    worker.start()
    try:
        up = LocalUpstream(worker, ready_wait=0.2)
        for _ in range(300):
            if worker.restarts > 2:
                break
            await asyncio.sleep(0.02)
        assert worker.state == "failed" and "bad file" in (worker.error or "")
        with pytest.raises(UpstreamError) as info:
            await up.generate(req()).__anext__()
        assert info.value.status == 503 and "bad file" in info.value.message
    finally:
        await worker.stop()


async def test_request_to_a_just_killed_worker_waits_for_the_next_one(fake_spec: WorkerSpec) -> None:
    worker = WorkerProcess(fake_spec, backoff=Backoff(first=0.05))
    worker.start()
    try:
        up = LocalUpstream(worker)
        assert await worker.wait_ready(10)
        old = worker.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        # No text had been sent, so the request is not lost: it is served by the restarted worker.
        events = [e async for e in up.generate(req(2))]
        assert isinstance(events[-1], Finished) and worker.pid != old
    finally:
        await worker.stop()
