"""A node on ``model.name: auto`` whose profile prefers a model that fits only in the household pool:
selection weighs the peers' offers (hearth.select.pool_pick), each node's memory counts once, and the
daemon runs the pick across the pool besides the model that fits it alone (fetching it first if needed)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hearth.config import Config
from hearth.hardware import GIB, Report, probe
from hearth.pool.capacity import Device, Offer, unclaimed
from hearth.select import load_catalogue, load_profiles, pool_pick, select

pytestmark = pytest.mark.unit

MACHINES = Path(__file__).resolve().parents[1] / "fixtures" / "machines"
CATALOGUE = load_catalogue()
PROFILES = load_profiles()


def office_pc(available_gib: float = 3.5) -> Report:
    """An 8 GB, 4-core office PC (the 'cpu' class prefers Gemma 3 4B) with little RAM free."""
    r = probe(MACHINES / "minipc-n100")
    return dataclasses.replace(r, memory=int(7.6 * GIB), memory_available=int(available_gib * GIB),
                               cpu=dataclasses.replace(r.cpu, cores=4))


def offer(node: str, gib: float, ready: bool = True, serving: tuple[str, ...] = (),
          members: tuple[str, ...] = ()) -> Offer:
    return Offer(node, f"hearth-{node}", (Device("CPU", "ram", int(gib * GIB), 10.0),), ready, serving, members)


def pick(offers: list[Offer], report: Report | None = None, me: str = "a", **settings: Any) -> Any:
    report = report or office_pc()
    config = Config().replace(**settings)
    alone = select(report, config, catalogue=CATALOGUE, profiles=PROFILES)
    return pool_pick(report, unclaimed(offers, me), alone, config, catalogue=CATALOGUE, profiles=PROFILES,
                     self_node=me)


def test_alone_the_office_pc_gets_less_than_its_profile_prefers() -> None:
    choice = select(office_pc(), catalogue=CATALOGUE, profiles=PROFILES)
    assert choice is not None and choice.hardware_class == "cpu" and choice.model.name == "qwen2.5-3b-instruct"


def test_the_preferred_model_runs_across_the_pool_when_the_offers_hold_it() -> None:
    got = pick([offer("a", 0.5), offer("b", 4.5)])
    assert got is not None and got.model.name == "gemma3-4b" and got.context == 8192
    assert got.members == ("hearth-b", "hearth-a") and got.offered == 5 * GIB
    assert got.estimate.total <= got.offered
    assert "2 nodes" in got.reason and "Qwen2.5 3B" in got.reason  # and the own model stays meanwhile
    # One big peer is enough on its own: the pool is that peer, with this node as its head.
    one = pick([offer("a", 0.5), offer("b", 6.0)])
    assert one is not None and one.members == ("hearth-b",) and "1 node " in one.reason


def test_the_context_shrinks_before_the_pool_gives_up() -> None:
    got = pick([offer("a", 0.0), offer("b", 4.3)])  # 4.76 GiB at 8k does not fit, 4.16 at 4k does
    assert got is not None and (got.model.name, got.context) == ("gemma3-4b", 4096)


@pytest.mark.parametrize("offers", [
    [offer("a", 0.5), offer("b", 2.0)],                      # not enough offered
    [offer("a", 0.5), offer("b", 4.5, ready=False)],         # the peer's rpc-server is not up
    [offer("a", 6.0)],                                       # no peer: this node alone is no pool
    [offer("a", 0.5), offer("b", 2.5), offer("b", 2.5)],     # one node's offer counts once, not twice
    # b is a member of c's pool (rpc-server serves one client): its memory is not free to count again.
    [offer("a", 0.5), offer("b", 4.5), offer("c", 0.2, serving=("qwen2.5-7b-instruct",), members=("b", "c"))],
    # A peer already serves the preferred model across the pool: the mesh routes there, no second pool.
    [offer("a", 0.5), offer("b", 4.5), offer("c", 0.0, serving=("gemma3-4b",))],
])
def test_no_pool_when_it_could_not_form_or_is_not_needed(offers: list[Offer]) -> None:
    assert pick(offers) is None


def test_a_pool_this_node_heads_does_not_hide_its_own_members() -> None:
    # The members a's own pools hold are what a plans with: they are not taken from a.
    offers = [offer("a", 0.5, members=("b",)), offer("b", 4.5)]
    assert [o.node for o in unclaimed(offers, "a")] == ["a", "b"]
    assert [o.node for o in unclaimed(offers, "c")] == ["a"]


def test_no_pool_when_the_preferred_model_fits_alone_or_auto_is_off() -> None:
    assert pick([offer("a", 0.5), offer("b", 40.0)], report=office_pc(7.0)) is None  # Gemma 3 4B fits alone
    assert pick([offer("a", 0.5), offer("b", 4.5)], **{"pool.auto": False}) is None
    assert pick([offer("a", 0.5), offer("b", 4.5)], **{"pool.enabled": False}) is None
    assert pick([offer("a", 0.5), offer("b", 4.5)], **{"model.name": "qwen2.5-3b-instruct"}) is None


def test_nothing_fits_alone_but_the_pool_holds_the_preferred_model() -> None:
    got = pool_pick(office_pc(0.3), [offer("a", 0.0), offer("b", 5.0)], None, Config(), catalogue=CATALOGUE,
                    profiles=PROFILES, self_node="a")
    assert got is not None and got.model.name == "gemma3-4b" and "meanwhile" not in got.reason


def test_a_ram_cap_on_the_own_model_picks_as_for_a_smaller_machine() -> None:
    from hearth.select import NothingFits

    # Alone with 6 GiB free the office PC runs Gemma 3 4B, its profile's best. Capped at 4 GiB it is a
    # 'cpu-small' machine (under 7 GiB), whatever it has; capped at 1 GiB nothing fits it, and the pool
    # gets that class's best.
    assert pick([offer("a", 0.5), offer("b", 2.0)], report=office_pc(6.0)) is None
    small = select(office_pc(6.0), Config().replace(**{"model.max_ram_mib": 4096}), catalogue=CATALOGUE,
                   profiles=PROFILES)
    assert small is not None and small.hardware_class == "cpu-small" and small.free == 4096 << 20
    capped = pool_pick(office_pc(6.0), [offer("a", 0.5), offer("b", 2.0)], None,
                       Config().replace(**{"model.max_ram_mib": 1024}), catalogue=CATALOGUE, profiles=PROFILES,
                       self_node="a")
    assert capped is not None and capped.model.name == "qwen2.5-1.5b-instruct"
    with pytest.raises(NothingFits) as caught:
        select(office_pc(6.0), Config().replace(**{"model.max_ram_mib": 512}), catalogue=CATALOGUE, profiles=PROFILES)
    assert "model.max_ram_mib" in caught.value.message and "model.max_ram_mib" in (caught.value.hint or "")


def test_offer_members_round_trip() -> None:
    o = offer("c", 1.0, serving=("m",), members=("a", "b"))
    assert Offer.from_dict(o.to_dict()) == o
    assert Offer.from_dict({k: v for k, v in o.to_dict().items() if k != "members"}).members == ()  # older peers


# --- the daemon's glue --------------------------------------------------------------------------------


async def test_the_node_fetches_the_pick_then_runs_it_across_the_pool(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from hearth.daemon import Node
    from hearth.serving import acquire

    node = Node(Config().replace(**{"state.dir": str(tmp_path), "model.context": 0}))
    node.report = office_pc()
    node.mesh = SimpleNamespace(node="a", name="hearth-a", peers={
        "b": SimpleNamespace(node="b", alive=True, state={"pool": offer("b", 4.5).to_dict()})})
    node.rpc = SimpleNamespace(ready=SimpleNamespace(is_set=lambda: True), state="ready")
    node.pool_devices = (Device("CPU", "ram", GIB // 2, 10.0),)
    kept: list[tuple[str, Path, dict[str, Any]]] = []
    node._pool_manager = lambda: SimpleNamespace(  # type: ignore[method-assign]
        keep=lambda name, path, **options: kept.append((name, path, options)))
    fetched: list[str] = []

    def fake_fetch(config: Any, name: str, progress: Any, stopped: Any, say: Any) -> Path:
        fetched.append(name)
        path = config.models_dir / f"{name}.gguf"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"GGUF")
        return path

    monkeypatch.setattr(acquire, "_default_fetch", fake_fetch)
    node.pending = ("qwen2.5-3b-instruct", {}, None)  # the own model is still coming: it goes first
    node.start_auto_pool(every=0.01)
    await asyncio.sleep(0.2)
    assert node.auto_pool is None and not fetched
    node.pending = None
    for _ in range(500):
        if kept:
            break
        await asyncio.sleep(0.01)
    assert fetched == ["gemma3-4b"]
    [(name, path, options)] = kept
    assert name == "gemma3-4b" and path.name == "gemma3-4b.gguf" and options["context"] == 8192
    assert node.auto_pool.model.name == "gemma3-4b"
    assert node.pool.upstreams == {}  # nothing local was stopped or replaced (there was none to start with)
    assert node._auto_pooling is not None and not node._auto_pooling.done()  # it watches for a rival head
    node.rpc = node.mesh = None  # fakes: nothing to stop there
    await node.stop(1.0)
    assert node._auto_pooling.done()


async def test_of_two_nodes_that_picked_the_same_model_the_lower_id_keeps_it(tmp_path: Path) -> None:
    """A household powered on together: both auto nodes weigh the same offers in the same round and head a
    pool for the same model. Once their offers cross, the one with the higher node id drops its pool."""
    from hearth.daemon import Node

    dropped: dict[str, list[str]] = {"a": [], "b": []}
    nodes = {}
    for me, peer in (("a", "b"), ("b", "a")):
        node = Node(Config().replace(**{"state.dir": str(tmp_path / me)}))
        node.mesh = SimpleNamespace(node=me, name=f"hearth-{me}", peers={
            peer: SimpleNamespace(node=peer, alive=True, state={"pool": offer(peer, 2.0, serving=("gemma3-4b",)).to_dict()})})
        node.auto_pool = SimpleNamespace(model=SimpleNamespace(name="gemma3-4b"))

        async def drop(name: str, me: str = me) -> bool:
            dropped[me].append(name)
            return True

        node.pooling = SimpleNamespace(drop=drop, heading=lambda: ("gemma3-4b",), ready=lambda: (), members=lambda: ())
        nodes[me] = node
    for node in nodes.values():
        await node._yield_auto_pool()
    assert dropped == {"a": [], "b": ["gemma3-4b"]}
    assert nodes["a"].auto_pool is not None and nodes["b"].auto_pool is None
    # A peer heading another model, or a dead one, changes nothing.
    nodes["b"].auto_pool = SimpleNamespace(model=SimpleNamespace(name="qwen2.5-7b-instruct"))
    await nodes["b"]._yield_auto_pool()
    nodes["b"].auto_pool = SimpleNamespace(model=SimpleNamespace(name="gemma3-4b"))
    nodes["b"].mesh.peers["a"].alive = False
    await nodes["b"]._yield_auto_pool()
    assert dropped["b"] == ["gemma3-4b"] and nodes["b"].auto_pool is not None


async def test_a_node_nothing_fits_alone_is_no_error_once_the_pool_serves_for_it(tmp_path: Path) -> None:
    from hearth.daemon import Node

    # This machine, probed for real, with 1 GiB for its own model: nothing in the catalogue fits.
    node = Node(Config().replace(**{"state.dir": str(tmp_path), "model.max_ram_mib": 1024}))
    await node.start_models()
    assert node.alone_failed and node.health()["status"] == "error"
    got = pool_pick(node.report, [offer("a", 0.0), offer("b", 5.0)], None, node.config, catalogue=CATALOGUE,
                    profiles=PROFILES, self_node="a")
    assert got is not None
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / got.model.file).write_bytes(b"GGUF")
    kept: list[str] = []
    node._pool_manager = lambda: SimpleNamespace(  # type: ignore[method-assign]
        keep=lambda name, path, **options: kept.append(name))
    node._run_pick(got)
    assert kept == [got.model.name]
    health = node.health()
    assert health["status"] != "error" and any("no model fits this node" in w and "runs across the household "
                                               "pool instead" in w for w in health["warnings"]), health
    await node.stop(1.0)


def test_auto_pooling_starts_only_for_auto_with_the_mesh(tmp_path: Path) -> None:
    from hearth.daemon import Node

    named = Node(Config().replace(**{"state.dir": str(tmp_path), "model.name": "gemma3-4b"}))
    named.mesh = SimpleNamespace(node="a")
    named.start_auto_pool()
    assert named._auto_pooling is None
    no_mesh = Node(Config().replace(**{"state.dir": str(tmp_path)}))
    no_mesh.start_auto_pool()
    assert no_mesh._auto_pooling is None


async def test_a_named_catalogue_model_too_big_for_the_node_is_fetched_for_the_pool(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What the wizard's "runs on 2 household nodes" choice leads to: model.name names a catalogue model
    # this node cannot hold and does not have; it is fetched once the mesh is up, then run across the pool.
    from hearth.daemon import Node
    from hearth.select import ModelTooBig
    from hearth.serving import acquire

    node = Node(Config().replace(**{"state.dir": str(tmp_path), "model.name": "gemma3-12b"}))
    assert node._pool_instead(ModelTooBig("too big")) and node.error is None
    assert node.pool_fetch is not None and node.pool_acquisition is None  # nothing before the mesh is up
    kept: list[str] = []
    node._pool_manager = lambda: SimpleNamespace(  # type: ignore[method-assign]
        keep=lambda name, path, **options: kept.append(name))

    def fake_fetch(config: Any, name: str, progress: Any, stopped: Any, say: Any) -> Path:
        path = config.models_dir / f"{name}.gguf"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"GGUF")
        return path

    monkeypatch.setattr(acquire, "_default_fetch", fake_fetch)
    node.mesh = SimpleNamespace(node="a", name="hearth-a", peers={}, channel=None)
    node.start_pooling()
    assert node.pool_acquisition is not None
    for _ in range(500):
        if kept:
            break
        await asyncio.sleep(0.01)
    assert kept == ["gemma3-12b"]
    node.mesh = None
    await node.stop(1.0)


# --- the wizard: asking the household over its channel ---------------------------------------------------


async def test_the_wizard_asks_the_household_over_its_channel(tmp_path: Path) -> None:
    """A real peer on the household channel (mutual TLS, loopback) offers 20 GiB: the wizard's services,
    holding only the join code, read its signed state and offer the models that fit only across the pool;
    another household's code reads nothing."""
    import shutil

    from fastapi import FastAPI

    from hearth import config as config_mod
    from hearth.mesh import household
    from hearth.mesh.client import household_states
    from hearth.mesh.service import MeshService
    from hearth.serving.router import Router
    from hearth_firstboot.services import Services

    secret = b"p" * 32
    cfg = config_mod.from_dict({"node": {"name": "hearth-b"}, "state": {"dir": str(tmp_path / "b")},
                                "mesh": {"discovery": False}})
    mesh = MeshService(cfg, Router(), household=household.Household(secret),
                       pool_state=lambda: offer(mesh.node, 20.0).to_dict())
    app = FastAPI()
    app.include_router(mesh.mesh_router())
    mesh.channel.host, mesh.channel.port, mesh.channel.app = "127.0.0.1", 0, app
    await mesh.channel.start()
    try:
        url = f"https://127.0.0.1:{mesh.channel.port}"
        [state] = await asyncio.to_thread(household_states, secret, [url, url])  # each peer once
        assert state["node"] == mesh.node and Offer.from_dict(state["pool"]).total == 20 * GIB
        assert await asyncio.to_thread(household_states, b"x" * 32, [url]) == []  # another household
        assert await asyncio.to_thread(household_states, secret, ["https://127.0.0.1:9"]) == []  # nobody there

        root = tmp_path / "root"
        shutil.copytree(MACHINES / "minipc-n100", root, symlinks=True)
        services = Services(root)
        hw = services.hardware()
        options = await asyncio.to_thread(services.pool_models, hw, household.code_for(secret), [url])
        alone = select(hw.report, catalogue=CATALOGUE, profiles=PROFILES)
        assert alone is not None and options, options
        names = {o.name for o in options}
        assert alone.model.name not in names and "gemma3-270m" not in names  # what fits alone is not a pool's
        for o in options:
            assert "household node" in o.label and f"hearth-{mesh.node}" in o.reason, o
            spec = next(m for m in CATALOGUE if m.name == o.name)
            assert spec.size_bytes > alone.model.size_bytes
        assert await asyncio.to_thread(services.pool_models, hw, household.code_for(b"x" * 32), [url]) == ()
    finally:
        await mesh.channel.stop()
