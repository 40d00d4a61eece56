"""The household pool's own logic: what a node offers, member selection, the layer split, the flags a
pooled llama-server gets, rpc-server's command line, and the manager forming, breaking and re-forming a
pool (against the fake llama-server of test_serving_server). The real split, with real rpc-servers and
Gemma, is in tests/integration/test_pool_split.py."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hearth.config import Config
from hearth.pool.capacity import MIB, Device, Offer, measure_bandwidth, offer_devices
from hearth.pool.manager import LocalEndpoint, PooledUpstream, PoolManager
from hearth.pool.plan import ModelLayout, PoolTooSmall, layout_from_gguf, plan, split_layers
from hearth.pool.rpcserver import RpcServer, cache_dir, write_stores
from hearth.serving.llamaserver import ServerSpec
from hearth.serving.local import Pool
from hearth.serving.router import Router
from hearth.serving.types import GenerationRequest, TokenChunk, UpstreamError

pytestmark = pytest.mark.unit

GIB = 1 << 30


def offer(node: str, *devices: tuple[str, int, float], ready: bool = True) -> Offer:
    return Offer(node, f"hearth-{node}", tuple(Device(n, "ram" if n == "CPU" else "vram", b, bw)
                                               for n, b, bw in devices), ready)


def layout(n_layers: int = 10, layer: int = 100 * MIB, output: int = 50 * MIB, kv: int = 0) -> ModelLayout:
    return ModelLayout((layer,) * n_layers, output, kv, context=0)


# --- the split ---------------------------------------------------------------------------------------


def test_split_follows_bandwidth_when_memory_allows() -> None:
    assert split_layers(12, [12, 12], [10.0, 20.0]) == [4, 8]
    assert split_layers(10, [10, 10, 10], [1.0, 1.0, 1.0]) in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    assert sum(split_layers(7, [7, 7], [3.0, 1.0])) == 7


def test_split_gives_what_a_capped_member_cannot_hold_to_the_others() -> None:
    # The fast member could take 9 of 10 layers, but holds only 3: the rest goes to the slow one.
    assert split_layers(10, [3, 10], [90.0, 10.0]) == [3, 7]
    # Three members, the fastest capped: the remainder is shared by bandwidth between the other two.
    assert split_layers(20, [2, 20, 20], [100.0, 30.0, 10.0]) == [2, 14, 4]


def test_split_refuses_when_the_caps_are_too_small() -> None:
    with pytest.raises(PoolTooSmall):
        split_layers(10, [4, 5], [1.0, 1.0])


def test_plan_picks_the_biggest_offers_and_keeps_the_output_on_the_head() -> None:
    lay = layout(10, 100 * MIB, 300 * MIB)
    offers = [offer("a", ("CPU", 700 * MIB, 10.0)), offer("b", ("CPU", 1200 * MIB, 10.0)),
              offer("c", ("CPU", 200 * MIB, 50.0))]
    p = plan(lay, offers, prefer="a")
    assert set(p.members) == {"a", "b"}  # the two biggest offers hold it: no third hop
    # The logits come back from the output's device every token: the head (a) keeps it when it can.
    assert p.shares[-1].node == "a" and p.shares[-1].output
    # A head that cannot hold the output leaves it to the roomiest member.
    other = plan(lay, offers, prefer="c")
    assert other.shares[-1].node == "b" and other.shares[-1].output
    assert sum(s.layers for s in p.shares) == 10 and p.tensor_split[-1] == p.shares[-1].layers + 1
    assert sum(p.tensor_split) == 11  # every layer plus the output, as llama.cpp counts them
    for s in p.shares:
        assert s.bytes <= s.offered, s


def test_plan_weighs_measured_bandwidth() -> None:
    lay = layout(12, 10 * MIB, 10 * MIB)
    p = plan(lay, [offer("slow", ("CPU", 4 * GIB, 10.0)), offer("fast", ("CPU", 4 * GIB, 30.0))])
    # One big offer holds it all: a pool of one member (no split needed).
    assert len(p.shares) == 1
    both = plan(layout(12, 300 * MIB, 10 * MIB), [offer("slow", ("CPU", 3 * GIB, 10.0)),
                                                  offer("fast", ("CPU", 3 * GIB, 30.0))])
    layers = {s.node: s.layers for s in both.shares}
    assert layers["fast"] > layers["slow"] and sum(layers.values()) == 12


def test_plan_ignores_members_whose_rpc_server_is_down_and_says_what_is_missing() -> None:
    lay = layout(10, 100 * MIB, 50 * MIB)
    offers = [offer("a", ("CPU", 700 * MIB, 10.0)), offer("b", ("CPU", 700 * MIB, 10.0), ready=False)]
    with pytest.raises(PoolTooSmall) as e:
        plan(lay, offers)
    assert "offers 700 MiB" in e.value.message and e.value.hint


def test_plan_uses_a_members_devices_in_its_order() -> None:
    lay = layout(10, 200 * MIB, 100 * MIB)
    p = plan(lay, [offer("a", ("CPU", 900 * MIB, 10.0), ("Vulkan0", 1500 * MIB, 40.0))])
    assert p.members == ("a",) and p.devices_of("a") == ("CPU", "Vulkan0")
    assert {s.device: s.layers for s in p.shares}["Vulkan0"] > {s.device: s.layers for s in p.shares}["CPU"]


# --- offers --------------------------------------------------------------------------------------------


def report(available: int, gpus: tuple[dict[str, object], ...] = ()) -> SimpleNamespace:
    return SimpleNamespace(memory_available=available, llama_cpp=SimpleNamespace(devices=gpus))


def test_offer_leaves_the_own_model_and_the_reserve() -> None:
    cfg = Config()
    devices = offer_devices(cfg, report(16 * GIB), own_need=5 * GIB, own_device="cpu", bandwidth_gbs=20.0)
    assert devices == (Device("CPU", "ram", 16 * GIB - 5 * GIB - 2048 * MIB, 20.0),)
    capped = offer_devices(cfg.replace(**{"pool.max_ram_mib": 1024}), report(16 * GIB), 5 * GIB, "cpu", 20.0)
    assert capped[0].bytes == 1024 * MIB
    assert offer_devices(cfg.replace(**{"pool.enabled": False}), report(16 * GIB)) == ()
    assert offer_devices(cfg, report(2 * GIB), own_need=1 * GIB) == ()  # nothing left: nothing offered


def test_offer_counts_the_own_model_against_the_gpu_it_runs_on() -> None:
    gpu = {"name": "Vulkan0", "type": "gpu", "memory_free": 12 * GIB}
    igpu = {"name": "Vulkan1", "type": "igpu", "memory_free": 8 * GIB}
    devices = offer_devices(Config(), report(8 * GIB, (gpu, igpu)), own_need=6 * GIB, own_device="gpu",
                            bandwidth_gbs=10.0)
    by_name = {d.name: d for d in devices}
    assert by_name["CPU"].bytes == 6 * GIB  # the model is on the GPU: RAM keeps only the reserve back
    assert by_name["Vulkan0"].bytes == 12 * GIB - 6 * GIB - 2 * GIB and by_name["Vulkan0"].kind == "vram"
    assert "Vulkan1" not in by_name  # an integrated GPU shares the RAM already offered


def test_offer_round_trips_and_bad_state_is_ignored() -> None:
    o = offer("a", ("CPU", GIB, 12.5))
    assert Offer.from_dict(o.to_dict()) == o
    for bad in (None, "x", {}, {"node": "a", "devices": [{"name": "CPU"}]}, {"node": "a", "devices": [{"bytes": "x"}]}):
        assert Offer.from_dict(bad) is None


def test_bandwidth_is_measured() -> None:
    assert measure_bandwidth(size=8 * MIB, rounds=2) > 0.1


# --- the servers' command lines ------------------------------------------------------------------------


def test_pooled_llama_server_flags() -> None:
    spec = ServerSpec(name="m", model_path=Path("m.gguf"), socket_path=Path("m.sock"), context=256,
                      command=("x",), rpc=("127.0.0.1:5001", "127.0.0.1:5002"), rpc_devices=(1, 0),
                      tensor_split=(7, 12))
    argv = spec.argv()
    flags = dict(zip(argv[1::1], argv[2::1], strict=False))
    assert flags["--rpc"] == "127.0.0.1:5001,127.0.0.1:5002"
    assert flags["--device"] == "RPC1,RPC0" and flags["--tensor-split"] == "7,12"
    assert argv.index("--rpc") < argv.index("--device")  # llama.cpp registers RPC devices as it reads --rpc
    plain = ServerSpec(name="m", model_path=Path("m.gguf"), socket_path=Path("m.sock"), command=("x",)).argv()
    assert "--rpc" not in plain and "--device" not in plain and "--tensor-split" not in plain


def test_rpc_server_binds_loopback_only_and_caches_under_the_state_dir(tmp_path: Path) -> None:
    server = RpcServer(50100, ("CPU", "Vulkan0"), state_dir=tmp_path, threads=3, binary=Path("/bin/rpc-server"))
    argv = server.argv()
    assert argv[argv.index("-H") + 1] == "127.0.0.1" and argv[argv.index("-p") + 1] == "50100"
    assert "-c" in argv and argv[argv.index("-d") + 1] == "CPU,Vulkan0" and argv[argv.index("-t") + 1] == "3"
    assert server.env()["LLAMA_CACHE"] == str(cache_dir(tmp_path)) and str(tmp_path) in server.env()["LLAMA_CACHE"]


def test_rpc_server_is_told_the_model_stores_it_may_load_weights_from(tmp_path: Path) -> None:
    # rpc-server (runtime patch 0002) reads <LLAMA_CACHE>/rpc/stores: one folder or GGUF file per line.
    store = tmp_path / "models"
    path = write_stores(tmp_path / "state", (store, tmp_path / "other" / ".." / "more"))
    assert path == cache_dir(tmp_path / "state") / "rpc" / "stores"
    assert path.read_text().splitlines() == [str(store), str(tmp_path / "more")]
    # A node offering no store leaves no list behind (a stale one would name a store it no longer offers).
    write_stores(tmp_path / "state", ())
    assert not path.exists()
    write_stores(tmp_path / "state", ())


# --- a model's layout from its GGUF ----------------------------------------------------------------------


def write_gguf(path: Path, n_layer: int = 3, tied: bool = False) -> Path:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_feed_forward_length(64)
    w.add_tensor("token_embd.weight", np.zeros((100, 32), dtype=np.float32))
    if not tied:
        w.add_tensor("output.weight", np.zeros((100, 32), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.zeros(32, dtype=np.float32))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((32, 32), dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_up.weight", np.zeros((64, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_layout_reads_every_layers_bytes(tmp_path: Path) -> None:
    from hearth.models.gguf import tensor_sizes

    path = write_gguf(tmp_path / "m.gguf")
    sizes = tensor_sizes(path)
    assert sizes["blk.0.attn_q.weight"] >= 32 * 32 * 4 and sizes["token_embd.weight"] >= 100 * 32 * 4
    assert sum(sizes.values()) <= path.stat().st_size
    lay = layout_from_gguf(path, context=64)
    assert lay.n_layers == 3 and all(b >= (32 * 32 + 64 * 32) * 4 for b in lay.layer_bytes)
    assert lay.output_bytes >= 100 * 32 * 4 + 32 * 4
    assert lay.kv_per_layer == 64 * 2 * (8 + 8) * 2  # context x KV heads x (K + V head size) x f16
    tied = layout_from_gguf(write_gguf(tmp_path / "t.gguf", tied=True), context=64)
    assert tied.output_bytes >= 100 * 32 * 4  # the tied embedding is copied onto the output's device


# --- the manager ------------------------------------------------------------------------------------------


@pytest.fixture
def fake_server(tmp_path: Path) -> tuple[str, ...]:
    from test_serving_server import FAKE_SERVER

    script = tmp_path / "fake_llama_server.py"
    script.write_text(FAKE_SERVER)
    return (sys.executable, str(script))


async def wait_until(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _manager(tmp_path: Path, offers: dict[str, Offer], **kw: Any) -> tuple[Router, Pool, PoolManager]:
    """A manager on node a whose members' rpc-servers are made-up loopback endpoints (the fake server never
    dials them), offered what *offers* holds at each look."""

    async def connect(node: str) -> LocalEndpoint:
        return LocalEndpoint(f"127.0.0.1:{5000 + ord(node[0])}")

    router = Router()
    serving = Pool(tmp_path / "run")
    return router, serving, PoolManager(serving, router, lambda: list(offers.values()), connect, self_node="a",
                                        retry_s=0.05, **kw)


async def test_manager_forms_serves_breaks_and_reforms(tmp_path: Path, fake_server: tuple[str, ...]) -> None:
    model = write_gguf(tmp_path / "big.gguf", n_layer=4)
    lay = layout_from_gguf(model, 64)
    room = lay.overhead + lay.output_bytes + 3 * lay.per_layer  # each member holds 3 of 4 layers at most
    offers = {"a": offer("a", ("CPU", room, 10.0)), "b": offer("b", ("CPU", room, 10.0)),
              "c": offer("c", ("CPU", room, 10.0))}
    router, serving, manager = _manager(tmp_path, offers, reform_wait_s=0.3)
    manager.keep("big", model, context=64, slots=1, command=fake_server)
    await wait_until(lambda: manager.ready() == ("big",))
    up = serving.upstreams["big"]
    assert isinstance(up, PooledUpstream) and len(up.members) == 2
    spec = up.worker.spec
    assert len(spec.rpc) == 2 and sum(spec.tensor_split) == 5 and len(spec.rpc_devices) == 2
    assert [m.name for m in router.models()] == ["big"] and router.models()[0].pool == up.members
    assert manager.status()["big"]["state"] == "ready"
    offload = up.worker.info["offload"]  # every layer on the members, none on the head: no GPU-idle warning
    assert offload["layers_offloaded"] == offload["layers_total"] == 5 and len(offload["devices_used"]) == 2

    request = GenerationRequest(model="big", kind="chat", messages=({"role": "user", "content": "hi"},), max_tokens=3)
    texts = [ev.text async for ev in router.generate(request) if isinstance(ev, TokenChunk)]
    assert texts == ["tok0 ", "tok1 ", "tok2 "]

    # A member leaves: the pool is torn down and formed again from what is left (c steps in).
    gone = next(n for n in ("a", "b") if f"hearth-{n}" in up.members)
    del offers[gone]
    await wait_until(lambda: manager.models["big"].formed == 2 and manager.ready() == ("big",))
    assert f"hearth-{gone}" not in serving.upstreams["big"].members
    texts = [ev.text async for ev in router.generate(request) if isinstance(ev, TokenChunk)]
    assert len(texts) == 3

    # Not enough memory left: the model stays listed, not loaded, and a request hears why.
    offers.clear()
    await wait_until(lambda: manager.status()["big"]["state"] == "waiting")
    assert [(m.name, m.loaded) for m in router.models()] == [("big", False)]
    with pytest.raises(UpstreamError) as e:
        async for _ in router.generate(request):
            pass
    assert e.value.status == 503 and "pool" in e.value.message and "offers" in e.value.message
    await manager.stop()
    await serving.stop()


async def test_manager_heads_what_it_keeps_and_drops_a_model(tmp_path: Path, fake_server: tuple[str, ...]) -> None:
    model = write_gguf(tmp_path / "big.gguf", n_layer=4)
    lay = layout_from_gguf(model, 64)
    room = lay.overhead + lay.output_bytes + 3 * lay.per_layer
    offers: dict[str, Offer] = {}
    router, serving, manager = _manager(tmp_path, offers)
    manager.keep("big", model, context=64, slots=1, command=fake_server)
    # Waiting for members already counts as heading it: a peer seeing it in this node's offer leaves it alone.
    await wait_until(lambda: manager.status()["big"]["state"] == "waiting")
    assert manager.heading() == ("big",) and manager.ready() == ()
    offers.update({"a": offer("a", ("CPU", room, 10.0)), "b": offer("b", ("CPU", room, 10.0))})
    await wait_until(lambda: manager.ready() == ("big",))
    assert await manager.drop("big")
    # Gone everywhere: no llama-server, no stand-in in the router, nothing headed, no members held.
    assert manager.heading() == () and manager.members() == () and "big" not in serving.upstreams
    assert router.models() == []
    assert not await manager.drop("big")
    await manager.stop()
    await serving.stop()


async def test_the_first_pool_waits_for_discovery_to_settle(tmp_path: Path, fake_server: tuple[str, ...]) -> None:
    """At start a node hears its peers one by one: its first pool is planned once the offers stop changing,
    so a bigger member heard a moment later is not left out for the first one heard."""
    model = write_gguf(tmp_path / "big.gguf", n_layer=4)
    lay = layout_from_gguf(model, 64)
    small = lay.overhead + lay.output_bytes + 3 * lay.per_layer
    offers = {"a": offer("a", ("CPU", small, 10.0)), "b": offer("b", ("CPU", small, 10.0))}
    _, serving, manager = _manager(tmp_path, offers, settle_s=0.5)
    manager.keep("big", model, context=64, slots=1, command=fake_server)
    await asyncio.sleep(0.3)
    assert manager.status()["big"]["state"] == "waiting"  # a and b would do, but discovery is still going on
    offers["c"] = offer("c", ("CPU", 4 * small, 10.0))  # the biggest member answers late
    await wait_until(lambda: manager.ready() == ("big",))
    assert "hearth-c" in serving.upstreams["big"].members
    await manager.stop()
    await serving.stop()


# --- the daemon's glue ---------------------------------------------------------------------------------------


async def test_node_takes_offers_only_from_live_peers_speaking_for_themselves(tmp_path: Path) -> None:
    from hearth.daemon import Node
    from hearth.pool.manager import PoolUnavailable

    node = Node(Config().replace(**{"state.dir": str(tmp_path)}))
    node.mesh = SimpleNamespace(node="me", name="hearth-me", peers={
        "p1": SimpleNamespace(node="p1", alive=True, state={"pool": offer("p1", ("CPU", GIB, 5.0)).to_dict()}),
        "p2": SimpleNamespace(node="p2", alive=False, state={"pool": offer("p2", ("CPU", GIB, 5.0)).to_dict()}),
        "p3": SimpleNamespace(node="p3", alive=True, state={"pool": offer("px", ("CPU", GIB, 5.0)).to_dict()}),
        "p4": SimpleNamespace(node="p4", alive=True, state={"pool": "junk"}),
        "p5": SimpleNamespace(node="p5", alive=True, state={}),
    })
    assert [o.node for o in node.pool_offers()] == ["p1"]  # this node offers nothing (no rpc-server)
    node.pool_devices = (Device("CPU", "ram", GIB, 9.0),)
    own = node.pool_offers()[0]
    assert own.node == "me" and not own.rpc_ready  # listed, but no pool uses it before its rpc-server is up
    with pytest.raises(PoolUnavailable):  # no channel: a peer's rpc-server is never reached in the clear
        await node.connect_member("p1")


def test_a_model_too_big_for_the_node_is_run_across_the_pool(tmp_path: Path) -> None:
    from hearth.daemon import Node
    from hearth.select import ModelTooBig

    store = tmp_path / "models"
    store.mkdir()
    write_gguf(store / "big.gguf")
    too_big = ModelTooBig("big needs 40 GiB; this node has 15.2 GiB free RAM")
    node = Node(Config().replace(**{"state.dir": str(tmp_path), "model.name": "big", "model.context": 2048}))
    assert node._pool_instead(too_big) and node.error is None
    [(name, path, options)] = node.pool_wanted
    assert name == "big" and path == store / "big.gguf" and options["context"] == 2048
    # With the pool off, or the file missing, it stays what it was: a node that cannot serve its model.
    off = Node(Config().replace(**{"state.dir": str(tmp_path), "model.name": "big", "pool.enabled": False}))
    assert not off._pool_instead(too_big)
    missing = Node(Config().replace(**{"state.dir": str(tmp_path), "model.name": "other"}))
    assert missing._pool_instead(too_big) and "must be in the store" in (missing.error or "")
