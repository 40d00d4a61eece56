"""The mesh API and peer upstreams in one process: two nodes over an in-memory ASGI transport."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi import FastAPI

from hearth import config as config_mod
from hearth.mesh import household
from hearth.mesh.client import MeshClient, PeerRefused
from hearth.mesh.peers import Peer, PeerUpstream
from hearth.mesh.service import MeshService, parse_peer
from hearth.serving.router import Router
from hearth.serving.types import (
    Finished,
    GenerationRequest,
    QueueFull,
    TokenChunk,
    UpstreamError,
    UpstreamLoad,
)

SECRET = b"h" * 32


class FakeUpstream:
    """A local worker that streams a fixed text, or fails."""

    node = "local"

    def __init__(self, model: str, fail: UpstreamError | None = None) -> None:
        self.model = model
        self.fail = fail
        self.seen: list[GenerationRequest] = []

    def load(self) -> UpstreamLoad:
        return UpstreamLoad(queued=0, capacity=4, tokens_per_second=10.0)

    async def generate(self, request: GenerationRequest):
        self.seen.append(request)
        if self.fail:
            raise self.fail
        for word in ("hello ", "from ", "the ", "peer"):
            yield TokenChunk(word)
        yield Finished("stop", 3, 4, served_by="local")

    async def embed(self, model, inputs):
        return [[1.0, 2.0] for _ in inputs], len(inputs)


def _node(tmp_path, name, upstreams, secret=SECRET):
    cfg = config_mod.from_dict({"node": {"name": name}, "state": {"dir": str(tmp_path / name)},
                                "mesh": {"discovery": False}})
    router = Router()
    for up in upstreams:
        router.add_upstream(up)
    mesh = MeshService(cfg, router, household=household.Household(secret))
    app = FastAPI()
    app.include_router(mesh.mesh_router())
    return mesh, router, app


def _client_to(app, mesh_from: MeshService) -> MeshClient:
    client = MeshClient(mesh_from.identity, mesh_from.household.secret, mesh_from.name, 8080)
    client.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://peer")
    return client


async def _peer(tmp_path, upstreams, secret=SECRET):
    """Node B serving *upstreams*, and node A's client and Peer for it after a real hello."""
    b, _, app = _node(tmp_path, "hearth-b", upstreams, secret)
    a, router_a, _ = _node(tmp_path, "hearth-a", [])
    client = _client_to(app, a)
    ans = await client.hello("http://peer")
    state = await client.state("http://peer", ans.node)
    peer = Peer(node=ans.node, name=ans.name, url="http://peer", host="test", source="manual", state=state)
    return a, b, client, peer


async def test_hello_proves_identity_and_state_lists_local_models(tmp_path):
    a, b, client, peer = await _peer(tmp_path, [FakeUpstream("gem")])
    assert peer.node == b.node and peer.name == "hearth-b"
    assert peer.loaded_models() == ["gem"]
    assert peer.state["capacity"] == 4


async def test_other_household_cannot_say_hello(tmp_path):
    b, _, app = _node(tmp_path, "hearth-b", [], secret=b"x" * 32)
    a, _, _ = _node(tmp_path, "hearth-a", [])
    with pytest.raises(PeerRefused, match="403"):
        await _client_to(app, a).hello("http://peer")


async def test_peer_upstream_streams_and_marks_the_hop(tmp_path):
    local = FakeUpstream("gem")
    a, b, client, peer = await _peer(tmp_path, [local])
    up = PeerUpstream(peer, "gem", client)
    events = [ev async for ev in up.generate(GenerationRequest(model="gem", kind="completion", prompt="hi"))]
    assert "".join(e.text for e in events if isinstance(e, TokenChunk)) == "hello from the peer"
    assert events[-1] == Finished("stop", 3, 4, served_by=b.node)
    assert local.seen[0].hops == 1
    assert up.inflight == 0


async def test_a_forwarded_request_is_never_forwarded_again(tmp_path):
    a, b, client, peer = await _peer(tmp_path, [FakeUpstream("gem")])
    body = json.dumps(GenerationRequest(model="gem", kind="completion", prompt="x", hops=2).to_json()).encode()
    url = "http://peer/mesh/v1/generate"
    resp = await client.http.post(url, content=body, headers=client.headers("POST", url, body))
    assert resp.status_code == 508


async def test_unknown_model_and_full_queue_are_errors_the_router_understands(tmp_path):
    a, b, client, peer = await _peer(tmp_path, [FakeUpstream("gem", fail=QueueFull("gem"))])
    with pytest.raises(QueueFull):
        async for _ in PeerUpstream(peer, "gem", client).generate(GenerationRequest(model="gem", kind="chat")):
            pass
    with pytest.raises(UpstreamError) as e:
        async for _ in PeerUpstream(peer, "nope", client).generate(GenerationRequest(model="nope", kind="chat")):
            pass
    assert e.value.status == 404 and e.value.before_first_token


async def test_unreachable_peer_fails_before_the_first_token_and_the_router_fails_over(tmp_path):
    a, b, client, peer = await _peer(tmp_path, [FakeUpstream("gem")])
    dead = Peer(node="dead", name="hearth-dead", url="http://127.0.0.1:9", host="127.0.0.1", source="manual",
                state={"models": [{"name": "gem", "loaded": True, "queued": 0, "capacity": 8,
                                   "tokens_per_second": 99.0}]})  # looks best: tried first
    real_http = client.http
    dead_client = MeshClient(a.identity, SECRET, a.name, 8080)
    router = Router()
    router.add_upstream(PeerUpstream(dead, "gem", dead_client))  # more headroom: tried first
    router.add_upstream(PeerUpstream(peer, "gem", client))
    events = [ev async for ev in router.generate(GenerationRequest(model="gem", kind="completion"))]
    assert isinstance(events[-1], Finished) and events[-1].served_by == b.node
    assert router.failovers == 1
    await dead_client.aclose()
    await real_http.aclose()


async def _serve_channel(mesh: MeshService, app: FastAPI) -> str:
    """Serve *app* on *mesh*'s household channel on loopback; its https URL."""
    mesh.channel.host, mesh.channel.port, mesh.channel.app = "127.0.0.1", 0, app
    await mesh.channel.start()
    return f"https://127.0.0.1:{mesh.channel.port}"


async def test_a_dropped_peer_ends_its_stream_at_once(tmp_path):
    """Over the real channel (the ASGI transport buffers whole answers)."""

    class Slow(FakeUpstream):
        async def generate(self, request):
            yield TokenChunk("one ")
            await asyncio.sleep(30)
            yield Finished("stop", 1, 1)

    b, _, app = _node(tmp_path, "hearth-b", [Slow("gem")])
    a, _, _ = _node(tmp_path, "hearth-a", [])
    url = await _serve_channel(b, app)
    peer = Peer(node=b.node, name="hearth-b", url=url, host="h", source="manual")
    client = MeshClient(a.identity, SECRET, a.name, 8080)
    try:
        stream = PeerUpstream(peer, "gem", client).generate(GenerationRequest(model="gem", kind="completion"))
        assert await stream.__anext__() == TokenChunk("one ")
        asyncio.get_running_loop().call_later(0.2, peer.gone.set)
        with pytest.raises(UpstreamError) as e:
            await asyncio.wait_for(stream.__anext__(), 5)
        assert not e.value.before_first_token and "dropped" in e.value.message
    finally:
        await client.aclose()
        await b.channel.stop()


async def test_an_answer_from_another_node_than_the_one_asked_is_refused(tmp_path):
    """The household CA signed its certificate, but its key is not the node the request was meant for."""
    b, _, app = _node(tmp_path, "hearth-b", [FakeUpstream("gem")])
    a, _, _ = _node(tmp_path, "hearth-a", [])
    url = await _serve_channel(b, app)
    client = MeshClient(a.identity, SECRET, a.name, 8080)
    try:
        assert (await client.state(url, b.node))["node"] == b.node  # the right node: fine
        with pytest.raises(PeerRefused, match=f"is {b.node}, not 00000000000000ff"):
            await client.state(url, "00000000000000ff")
        impostor = Peer(node="00000000000000ff", name="hearth-x", url=url, host="h", source="manual")
        with pytest.raises(UpstreamError) as e:
            async for _ in PeerUpstream(impostor, "gem", client).generate(GenerationRequest(model="gem", kind="completion")):
                pass
        assert e.value.before_first_token and "not 00000000000000ff" in e.value.message
    finally:
        await client.aclose()
        await b.channel.stop()


def test_parse_peer():
    assert parse_peer("10.0.0.2", 8080) == ("10.0.0.2", 8080)
    assert parse_peer("hearth-7f3a.local:9000", 8080) == ("hearth-7f3a.local", 9000)
    assert parse_peer("[fe80::1]:81", 8080) == ("fe80::1", 81)
    assert parse_peer("fe80::1", 8080) == ("fe80::1", 8080)


def test_peer_url_from_what_a_person_types():
    from hearth.mesh.client import peer_url_of

    assert peer_url_of("10.0.0.5") == "https://10.0.0.5:8081"  # the mesh port, over TLS
    assert peer_url_of("hearth-7f3a.local:9000/") == "https://hearth-7f3a.local:9000"
    assert peer_url_of("http://10.0.0.5:9443") == "https://10.0.0.5:9443"
    assert peer_url_of("fe80::1") == peer_url_of("[fe80::1]") == "https://[fe80::1]:8081"


def test_rank_addresses_drops_our_own_and_prefers_a_shared_subnet():
    from hearth.mesh.discovery import rank_addresses

    # Two VMs behind qemu's user network: both 10.0.2.15; the LAN between them is link-local.
    me = [("10.0.2.15", 24), ("169.254.7.1", 16)]
    assert rank_addresses(["10.0.2.15", "169.254.9.9"], me) == ("169.254.9.9",)
    # A routable shared subnet beats link-local, which beats an address on no subnet of ours.
    me = [("192.168.1.5", 24), ("169.254.7.1", 16)]
    assert rank_addresses(["172.18.0.1", "169.254.3.3", "192.168.1.9"], me) == (
        "192.168.1.9", "169.254.3.3", "172.18.0.1")
    # Only our own addresses (or none): nothing to greet.
    assert rank_addresses(["192.168.1.5"], me) == ()
    assert rank_addresses([], me) == ()
    # Duplicates announced twice count once.
    assert rank_addresses(["192.168.1.9", "192.168.1.9"], me) == ("192.168.1.9",)


class SlowUpstream(FakeUpstream):
    """A worker that thinks for *pause* seconds before each token (a long prompt, a slow CPU)."""

    def __init__(self, model: str, pause: float) -> None:
        super().__init__(model)
        self.pause = pause
        self.closed = False

    async def generate(self, request: GenerationRequest):
        try:
            for word in ("slow ", "but ", "alive"):
                await asyncio.sleep(self.pause)
                yield TokenChunk(word)
            yield Finished("stop", 1, 3, served_by="local")
        finally:
            self.closed = True


async def test_a_slow_node_says_it_is_working_between_tokens(tmp_path, monkeypatch):
    from hearth.mesh import api as mesh_api

    monkeypatch.setattr(mesh_api, "HEARTBEAT_S", 0.05)
    b, _, _ = _node(tmp_path, "hearth-b", [])
    slow = SlowUpstream("gem", pause=0.3)
    lines = [json.loads(x) async for x in mesh_api._stream(b, [slow], GenerationRequest(model="gem", kind="chat"))]
    kinds = [x["type"] for x in lines]
    assert kinds.count("working") >= 6, kinds  # about 5 per 0.3 s pause
    assert [x["text"] for x in lines if x["type"] == "token"] == ["slow ", "but ", "alive"]
    assert kinds[-1] == "finished"
    # The asking node reads through the heartbeats: only tokens and the end reach its router.
    a, b2, client, peer = await _peer(tmp_path, [SlowUpstream("gem", pause=0.2)])
    events = [ev async for ev in PeerUpstream(peer, "gem", client).generate(GenerationRequest(model="gem", kind="chat"))]
    assert "".join(e.text for e in events if isinstance(e, TokenChunk)) == "slow but alive"
    assert isinstance(events[-1], Finished)


async def test_hanging_up_on_a_slow_node_stops_its_generation(tmp_path, monkeypatch):
    from hearth.mesh import api as mesh_api

    monkeypatch.setattr(mesh_api, "HEARTBEAT_S", 0.05)
    b, _, _ = _node(tmp_path, "hearth-b", [])
    slow = SlowUpstream("gem", pause=5.0)
    stream = mesh_api._stream(b, [slow], GenerationRequest(model="gem", kind="chat"))
    assert json.loads(await anext(stream))["type"] == "working"
    await stream.aclose()  # what Starlette does when the asking node hangs up
    assert slow.closed
