"""A client that hangs up stops its generation, through real HTTP (uvicorn on loopback)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from hearth.api.app import create_app
from hearth.api.testing import FakeRouter, FakeRuntime

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


@contextlib.asynccontextmanager
async def serve(runtime: FakeRuntime, port: int) -> AsyncIterator[str]:
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
def runtime(tmp_path: Path) -> FakeRuntime:
    return FakeRuntime(tmp_path, router=FakeRouter(words=tuple(f" w{i}" for i in range(2000)), delay=0.005))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
async def test_hanging_up_mid_stream_cancels(runtime: FakeRuntime, free_port: int, path: str) -> None:
    async with serve(runtime, free_port) as url, httpx.AsyncClient(base_url=url) as c:
        async with c.stream("POST", path, json={**CHAT, "stream": True}) as r:
            assert r.status_code == 200
            got = 0
            async for _ in r.aiter_bytes():
                got += 1
                if got >= 3:
                    break
        rec = runtime.router.records[0]
        await asyncio.wait_for(rec.closed.wait(), 5)
        assert rec.cancelled and not rec.finished and rec.tokens_sent < 2000
        # The node still serves, and counted the hang-up.
        r = await c.post("/v1/completions", json={"model": "fake", "prompt": "p", "max_tokens": 2})
        assert r.status_code == 200
        assert "hearth_api_client_disconnects_total 1" in (await c.get("/metrics")).text


async def test_hanging_up_while_queued_cancels(runtime: FakeRuntime, free_port: int) -> None:
    runtime.router.hold_first = asyncio.Event()
    async with serve(runtime, free_port) as url:
        for body in ({**CHAT, "stream": True}, CHAT):
            async with httpx.AsyncClient(base_url=url) as c:
                task = asyncio.create_task(c.post("/v1/chat/completions", json=body))
                while len(runtime.router.records) < (1 if body.get("stream") else 2):
                    await asyncio.sleep(0.01)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            rec = runtime.router.records[-1]
            await asyncio.wait_for(rec.closed.wait(), 5)
            assert rec.cancelled and rec.tokens_sent == 0


async def test_hanging_up_a_whole_answer_cancels(runtime: FakeRuntime, free_port: int) -> None:
    async with serve(runtime, free_port) as url:
        async with httpx.AsyncClient(base_url=url) as c:
            task = asyncio.create_task(c.post("/api/generate", json={"model": "fake", "prompt": "p", "stream": False}))
            while not runtime.router.records or runtime.router.records[0].tokens_sent < 3:
                await asyncio.sleep(0.01)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        rec = runtime.router.records[0]
        await asyncio.wait_for(rec.closed.wait(), 5)
        assert rec.cancelled and not rec.finished
