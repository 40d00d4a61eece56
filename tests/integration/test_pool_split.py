"""A model split across two real llama.cpp rpc-servers on loopback by the agent's own pool code, served
through the real API and streamed with the official ``openai`` client (Gemma 3 270M).

No channel is involved here (both rpc-servers are on this machine, as a pool's head reaches its own); the
three-namespace test over the mesh's channel is tests/netns/test_pool_mesh.py. Memory caps in config
(``pool.max_ram_mib``) force the split: neither member alone may hold the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hearth.api.app import create_app
from hearth.api.testing import FakeRuntime
from hearth.config import Config
from hearth.pool.capacity import MIB, Offer, measure_bandwidth, offer_devices
from hearth.pool.manager import LocalEndpoint, PoolManager
from hearth.pool.plan import layout_from_gguf, plan
from hearth.pool.rpcserver import RpcServer, cache_dir
from hearth.serving.local import Pool
from hearth.serving.router import Router

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.integration

PROMPT = "Write a short story about a lighthouse keeper."
CONTEXT = 512


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stream(url: str, model: str, max_tokens: int = 32, kill: Any = None) -> dict[str, Any]:
    """Greedy chat completion streamed with the openai client; *kill* runs after the 3rd chunk."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    chunks: list[str] = []
    t0 = time.monotonic()
    first = None
    error = None
    killed_at = None
    try:
        for ch in client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=max_tokens, temperature=0, seed=1, stream=True):
            if ch.choices and ch.choices[0].delta.content:
                first = first or time.monotonic() - t0
                chunks.append(ch.choices[0].delta.content)
                if kill is not None and len(chunks) == 3:
                    kill()
                    killed_at = time.monotonic()
    except openai.APIError as e:
        error = e
    ended = time.monotonic()
    return {"text": "".join(chunks), "chunks": len(chunks), "ttft": first, "total": ended - t0, "error": error,
            "after_kill": ended - killed_at if killed_at else None}


def rss(pid: int | None) -> int:
    """Resident memory of a process, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@contextlib.asynccontextmanager
async def api(router: Router, state: Path) -> AsyncIterator[str]:
    """The real API app over *router* on a loopback port."""
    import uvicorn

    runtime = FakeRuntime(state, Config())
    runtime.router = router  # type: ignore[assignment]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), log_config=None, access_log=False, ws="none"))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def both_ready(manager: PoolManager, serving: Pool, single: Any, timeout: float = 180) -> None:
    """Wait until the pooled model and the single-node reference both serve."""
    deadline = time.monotonic() + timeout
    while manager.ready() != ("pooled",) or single.worker.state != "ready":
        assert time.monotonic() < deadline, (manager.status(), serving.upstreams["pooled"].worker.log_tail
                                             if "pooled" in serving.upstreams else None)
        await asyncio.sleep(0.2)


async def test_a_model_split_across_two_rpc_servers_answers_like_one_node(
        tmp_path: Path, gemma_path: Path, llama_runtime: Any) -> None:
    layout = layout_from_gguf(gemma_path, CONTEXT)
    # Each member may hold the output layer and a little over half the other layers: the caps force a split.
    cap_mib = (layout.output_bytes + layout.overhead + (layout.n_layers // 2 + 2) * layout.per_layer) // MIB
    assert cap_mib * MIB < layout.total
    cfg = Config().replace(**{"pool.max_ram_mib": cap_mib, "pool.threads": 1})
    bandwidth = measure_bandwidth()
    servers, offers = [], []
    for name in ("a", "b"):
        devices = offer_devices(cfg, SimpleNamespace(memory_available=64 << 30, llama_cpp=None), 0, "cpu", bandwidth)
        server = RpcServer(_port(), [d.name for d in devices], state_dir=tmp_path / name, threads=1,
                           ram_limit=devices[0].bytes)
        server.start()
        servers.append(server)
        offers.append(Offer(name, f"hearth-{name}", devices, rpc_ready=True))
    for server in servers:
        assert await asyncio.wait_for(server.ready.wait(), 60), server.log_tail
    assert sorted(plan(layout, offers).members) == ["a", "b"]
    idle = [rss(server.pid) for server in servers]

    by_node = dict(zip(("a", "b"), servers, strict=True))

    def live_offers() -> list[Offer]:
        return [o for o in offers if by_node[o.node].ready.is_set()]

    async def connect(node: str) -> LocalEndpoint:
        return LocalEndpoint(by_node[node].address)

    router = Router()
    serving = Pool(tmp_path / "run")
    manager = PoolManager(serving, router, live_offers, connect, self_node="a", retry_s=0.2)
    manager.keep("pooled", gemma_path, context=CONTEXT, slots=1, threads=2)
    # The single-node reference computes with the kernels the members' rpc-servers use: rpc-server's CPU
    # buffers are never repacked, and a repacked single node can flip a near-tie (measured: it does here).
    single = serving.add("single", gemma_path, context=CONTEXT, slots=1, threads=2, repack=False)
    router.add_upstream(single)
    try:
        async with api(router, tmp_path) as url:
            await both_ready(manager, serving, single)
            # Both members really hold part of the model: their resident memory grew by their share.
            held = [rss(server.pid) - idle[i] for i, server in enumerate(servers)]
            assert all(h > 20 * MIB for h in held), held
            assert sum(held) > 0.8 * (layout.total - layout.overhead), (held, layout.total)

            one = await asyncio.to_thread(stream, url, "single")
            split = await asyncio.to_thread(stream, url, "pooled")
            assert one["error"] is None and split["error"] is None
            assert one["chunks"] >= 8 and split["text"] == one["text"], (one["text"], split["text"])

            import httpx

            models = (await asyncio.to_thread(httpx.get, url + "/v1/models")).json()["data"]
            assert sorted({m["id"]: m.get("pool") for m in models}["pooled"]) == ["hearth-a", "hearth-b"]

            # A member dies mid-stream: the stream ends with a clean error within 5 s, never a hang ...
            victim = servers[1]
            cut = await asyncio.to_thread(stream, url, "pooled", 400,
                                          lambda: os.kill(victim.pid or 0, signal.SIGKILL))
            assert cut["error"] is not None and cut["after_kill"] < 5.0, cut
            # ... its rpc-server is restarted, the pool forms again, and the next request is served.
            again = await asyncio.to_thread(stream, url, "pooled")
            assert again["error"] is None and again["text"] == one["text"]
            assert victim.restarts >= 1
            # Tensors over 10 MiB came over RPC once and now sit in the member's cache under its state dir.
            cached = [p for n in ("a", "b") for p in (cache_dir(tmp_path / n) / "rpc").glob("*")]
            assert cached and all(len(p.name) == 16 for p in cached)
    finally:
        await manager.stop()
        await serving.stop()
        for server in servers:
            await server.stop()


async def test_a_member_that_has_the_model_loads_its_share_from_its_own_store(
        tmp_path: Path, gguf_maker: Any, llama_runtime: Any) -> None:
    # A generated model whose FFN weights are over llama.cpp's 10 MiB hash threshold (768 x 3584 f32, 10.5
    # MiB): those are the weights the head announces by hash, so a member can find them on its own disk.
    store_b = tmp_path / "b-models"
    store_b.mkdir()
    model = gguf_maker(store_b / "wide.gguf", n_embd=768, n_layer=6, n_head=4, n_ff=3584, n_ctx=256)
    layout = layout_from_gguf(model, 256)
    cap_mib = (layout.output_bytes + layout.overhead + (layout.n_layers // 2 + 1) * layout.per_layer) // MIB
    assert cap_mib * MIB < layout.total
    cfg = Config().replace(**{"pool.max_ram_mib": cap_mib, "pool.threads": 1})
    bandwidth = measure_bandwidth()
    servers: dict[str, RpcServer] = {}
    offers = []
    # Member a has no copy of the model; member b has it in its store.
    for name, stores in (("a", ()), ("b", (store_b,))):
        devices = offer_devices(cfg, SimpleNamespace(memory_available=64 << 30, llama_cpp=None), 0, "cpu", bandwidth)
        servers[name] = RpcServer(_port(), [d.name for d in devices], state_dir=tmp_path / name, threads=1,
                                  ram_limit=devices[0].bytes, stores=stores)
        servers[name].start()
        offers.append(Offer(name, f"hearth-{name}", devices, rpc_ready=True))
    for server in servers.values():
        assert await asyncio.wait_for(server.ready.wait(), 60), server.log_tail
    assert sorted(plan(layout, offers).members) == ["a", "b"]

    async def connect(node: str) -> LocalEndpoint:
        return LocalEndpoint(servers[node].address)

    router = Router()
    serving = Pool(tmp_path / "run")
    manager = PoolManager(serving, router, lambda: offers, connect, self_node="a", retry_s=0.2)
    manager.keep("pooled", model, context=256, slots=1, threads=2)
    single = serving.add("single", model, context=256, slots=1, threads=2, repack=False)
    router.add_upstream(single)
    try:
        async with api(router, tmp_path) as url:
            await both_ready(manager, serving, single)
            # b read its share's big weights from the GGUF in its store ...
            from_store = [line for line in servers["b"].log_tail if "from the model store" in line]
            assert from_store and all(str(store_b.resolve()) in line for line in from_store), list(
                servers["b"].log_tail)
            # ... so nothing of them came over RPC into its tensor cache (no second copy on its disk), while a,
            # which has no copy, received its share and cached it.
            cached = {n: [p.name for p in (cache_dir(tmp_path / n) / "rpc").iterdir() if len(p.name) == 16]
                      for n in servers}
            assert cached["b"] == [] and cached["a"], cached
            assert not any("from the model store" in line for line in servers["a"].log_tail)
            # The weights b loaded are the right ones: the pooled answer is the single node's, token for token.
            one = await asyncio.to_thread(stream, url, "single")
            split = await asyncio.to_thread(stream, url, "pooled")
            assert one["error"] is None and split["error"] is None
            assert one["chunks"] >= 8 and split["text"] == one["text"], (one["text"], split["text"])
    finally:
        await manager.stop()
        await serving.stop()
        for server in servers.values():
            await server.stop()
