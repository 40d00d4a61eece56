"""The mesh service: owns the shared AsyncZeroconf and the household channel, finds candidates (mDNS and
manual peers), proves them with a signed hello over the channel, polls their signed state every second,
and keeps the router's peer upstreams in step.

A candidate becomes a peer only after the channel's TLS handshake proves it holds a certificate from the
household CA, its hello proves the household secret (HMAC bound to our nonce) and its node key (Ed25519
over our challenge), its key fingerprint matches what mDNS announced, and its state answer comes over a
connection whose certificate is that node's. A peer that stops answering is dropped within DROP_AFTER_S +
one poll, and its open streams end at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .. import __version__ as hearth_version
from ..config import Config
from ..errors import HearthError
from ..serving.types import Upstream
from . import PROTOCOL_VERSION
from . import household as household_mod
from . import identity as identity_mod
from .auth import Verifier, derive_key
from .channel import Channel
from .client import MeshClient, PeerRefused
from .discovery import Candidate, Discovery, local_addresses
from .peers import Peer, PeerUpstream

log = logging.getLogger(__name__)

POLL_S = 1.0
"""How often a peer's state is fetched (its heartbeat)."""
STATE_TIMEOUT_S = 1.0
DROP_AFTER_S = 3.0
"""A peer with no good state answer for this long is dropped (plus at most one poll: under 5 s)."""
LEARNED_GIVE_UP_S = 10.0
"""A learned candidate (from a peer's hello or state) that never answers for this long is forgotten."""
REFUSED_RETRY_S = 5.0
"""How often a candidate that failed its proof is asked again (it may join the household later)."""
ADDRESS_POLL_S = 2.0
"""How often this node's own addresses are checked: a cable plugged in late, a DHCP lease that arrives
after the agent started, or an IPv4 link-local address claimed on a LAN without DHCP all mean announcing
again (and joining the multicast group on the new interface, which python-zeroconf does only at start)."""


def parse_peer(spec: str, default_port: int) -> tuple[str, int]:
    """'host', 'host:port', 'IPv4:port' or '[IPv6]:port' -> (host, port)."""
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if spec.count(":") == 1:
        host, _, port = spec.partition(":")
        return host, int(port)
    return spec, default_port


def base_url(host: str, port: int) -> str:
    """https://host:port (a peer's channel) with IPv6 brackets."""
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


@dataclass
class _Candidate:
    url: str
    host: str
    source: str
    claimed_node: str = ""
    claimed_fingerprint: str = ""
    instance: str = ""
    refused: str = ""
    task: asyncio.Task[None] | None = None
    peer: Peer | None = None
    upstreams: dict[str, PeerUpstream] = field(default_factory=dict)


class MeshService:
    """Runs this node's part of the household mesh; start() and stop() belong to the daemon's lifecycle."""

    def __init__(self, config: Config, router: Any = None, *,
                 local_upstreams: Callable[[], list[Upstream]] | None = None,
                 identity: identity_mod.Identity | None = None,
                 household: household_mod.Household | None = None,
                 interfaces: list[str] | None = None,
                 pool_state: Callable[[], dict[str, Any]] | None = None) -> None:
        self.config = config
        self.router = router
        self.identity = identity or identity_mod.load_or_create(config.state.dir)
        hh = household or household_mod.load(config.state.dir)
        if hh is None:
            raise household_mod.HouseholdError("the mesh needs a household",
                                               hint="'hearth household create' or 'hearth household join CODE'")
        self.household = hh
        self.name = config.node.name or self.identity.default_name
        self.node = self.identity.node_id
        self.api_port = config.api.port
        self.mesh_port = config.mesh.port
        self.verifier = Verifier(derive_key(hh.secret))
        self.channel = Channel(self.identity, hh, host=config.api.host, port=config.mesh.port)
        """This node's end of the household channel (mutual TLS): node-to-node requests and tunnels."""
        self.interfaces = interfaces
        self._local_upstreams = local_upstreams
        self._pool_state = pool_state
        """What this node offers the household pool (hearth.pool.capacity.Offer.to_dict), published as 'pool'."""
        self.client: MeshClient | None = None
        self.candidates: dict[str, _Candidate] = {}
        self.peers: dict[str, Peer] = {}
        self.started_at = time.time()
        self._zc: Any = None
        self._discovery: Discovery | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sha_cache: dict[tuple[str, int, int], str] = {}
        self._store: Any = None

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the household channel, announce this node, browse for peers and poll the manual ones."""
        from fastapi import FastAPI

        app = FastAPI(title="Hearth mesh", docs_url=None, redoc_url=None, openapi_url=None)
        app.include_router(self.mesh_router())
        self.channel.app = app
        await self.channel.start()
        self.client = MeshClient(self.identity, self.household.secret, self.name, self.api_port,
                                 context=self.channel.http_context(), mesh_port=self.channel.port)
        # Each peer is polled every second: httpx's per-request INFO lines would flood the journal.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        if self.router is not None:
            self.router.add_source(self)
        if self.config.mesh.discovery:
            await self._start_discovery()
            if not self.interfaces:
                self._spawn(self._follow_addresses())
        for spec in self.config.mesh.peers:
            host, port = parse_peer(spec, self.mesh_port)
            self._add_candidate(base_url(host, port), host, "manual")
        log.info("mesh: node %s (%s) in household %s, %d manual peer(s), discovery %s", self.name, self.node,
                 self.household.id, len(self.config.mesh.peers), "on" if self._discovery else "off")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_discovery(self) -> None:
        from zeroconf import InterfaceChoice, IPVersion
        from zeroconf.asyncio import AsyncZeroconf

        addresses = self.interfaces or local_addresses(self.config.api.host)
        self._zc = AsyncZeroconf(interfaces=self.interfaces or InterfaceChoice.All, ip_version=IPVersion.V4Only)
        self._discovery = Discovery(self._zc, self.name, self.node, self.api_port, self.identity.fingerprint,
                                    addresses, self._found, self._gone, mesh_port=self.channel.port)
        await self._discovery.start()

    async def _stop_discovery(self) -> None:
        if self._discovery is not None:
            await self._discovery.stop()
            self._discovery = None
        if self._zc is not None:
            await self._zc.async_close()
            self._zc = None

    async def _follow_addresses(self) -> None:
        """Announce again, on every interface, whenever this node's addresses change."""
        while True:
            await asyncio.sleep(ADDRESS_POLL_S)
            try:
                now = local_addresses(self.config.api.host)
                before = self._discovery.addresses if self._discovery is not None else []
                if self._discovery is not None and sorted(now) == sorted(before):
                    continue
                log.info("mesh: addresses changed (%s -> %s): announcing again", ", ".join(before) or "none",
                         ", ".join(now) or "none")
                await self._stop_discovery()
                await self._start_discovery()
            except asyncio.CancelledError:
                raise
            except Exception:  # discovery stays off until the next check tries again
                log.exception("mesh: announcing the new addresses failed")
                with contextlib.suppress(Exception):
                    await self._stop_discovery()

    async def stop(self) -> None:
        """Unregister from mDNS, stop polling, drop every peer from the router, close the shared instances."""
        if self.router is not None:
            self.router.remove_source(self)
        for cand in list(self.candidates.values()):
            self._forget(cand)
        tasks = [c.task for c in self.candidates.values() if c.task] + list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.candidates.clear()
        await self._stop_discovery()
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        await self.channel.stop()

    # --- candidates --------------------------------------------------------------------------------------

    def _found(self, c: Candidate) -> None:
        url = base_url(c.host, c.port)
        for old_url, old in list(self.candidates.items()):
            # The node moved (a new lease, another interface): its old address is no use any more.
            if old.source == "mdns" and old.instance == c.instance and old_url != url:
                log.info("mesh: %s moved from %s to %s", c.instance, old_url, url)
                self._drop_candidate(old_url)
        cand = self.candidates.get(url)
        if cand is None:
            cand = self._add_candidate(url, c.host, "mdns")
        cand.claimed_node, cand.claimed_fingerprint, cand.instance = c.node, c.fingerprint, c.instance

    def _gone(self, instance: str) -> None:
        for url, cand in list(self.candidates.items()):
            if cand.instance == instance and cand.source == "mdns":
                log.info("mesh: %s said goodbye on mDNS", instance)
                self._drop_candidate(url)

    def _drop_candidate(self, url: str) -> None:
        cand = self.candidates.pop(url)
        self._forget(cand)
        if cand.task:
            cand.task.cancel()

    def _add_candidate(self, url: str, host: str, source: str) -> _Candidate:
        cand = _Candidate(url=url, host=host, source=source)
        self.candidates[url] = cand
        cand.task = asyncio.ensure_future(self._watch(cand))
        return cand

    def learn(self, host: str, port: int) -> None:
        """A node we did not know proved itself to us (its hello) or a peer knows it: try it as a candidate.

        This is what makes one manual entry enough on a network without multicast: the node that has it
        greets us, we greet it back, and peers pass it on in their state."""
        if not (1 <= port <= 65535) or self.client is None:
            return
        url = base_url(host, port)
        if url not in self.candidates and not any(p.url == url for p in self.peers.values()):
            self._add_candidate(url, host, "learned")

    async def _watch(self, cand: _Candidate) -> None:
        """Prove a candidate, then poll its state; drop it when it stops answering."""
        assert self.client is not None
        failing_since: float | None = None
        born = time.monotonic()
        while True:
            delay = POLL_S
            if cand.source == "learned" and cand.peer is None and time.monotonic() - born > LEARNED_GIVE_UP_S:
                if self.candidates.get(cand.url) is cand:
                    del self.candidates[cand.url]
                return
            try:
                if cand.peer is None:
                    delay = await self._greet(cand)
                else:
                    state = await self.client.state(cand.url, cand.peer.node, timeout=STATE_TIMEOUT_S)
                    self._update(cand, state)
                failing_since = None
            except PeerRefused as e:
                if cand.peer is not None:
                    self._forget(cand, f"refused: {e}")
                # Said once at WARNING; a stranger that stays a stranger is not news every 5 s.
                level = logging.DEBUG if cand.refused == str(e) else logging.WARNING
                cand.refused = str(e)
                log.log(level, "mesh: %s candidate %s refused: %s", cand.source, cand.url, e)
                delay = REFUSED_RETRY_S
            except httpx.ConnectError as e:
                # Connection refused (the process died) or unreachable: drop at once.
                if cand.peer is not None:
                    self._forget(cand, f"unreachable ({e})")
                    born = time.monotonic()
                delay = 0.5
            except (httpx.HTTPError, ValueError) as e:
                now = time.monotonic()
                failing_since = failing_since or now
                if cand.peer is not None and now - failing_since + POLL_S >= DROP_AFTER_S:
                    self._forget(cand, f"no answer for {now - failing_since + POLL_S:.1f} s ({type(e).__name__})")
                delay = 0.25
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad peer must never stop the mesh
                log.exception("mesh: watching %s failed", cand.url)
                delay = REFUSED_RETRY_S
            if delay < 0:
                if self.candidates.get(cand.url) is cand:
                    del self.candidates[cand.url]
                return
            await asyncio.sleep(delay)

    async def _greet(self, cand: _Candidate) -> float:
        """Hello and a first state; returns how long to wait before the next poll."""
        assert self.client is not None
        ans = await self.client.hello(cand.url, cand.claimed_node)
        if ans.node == self.node:
            if cand.source == "learned":
                return -1.0  # ourselves, as a peer saw us: nothing to watch
            return 30.0  # ourselves, through a manual entry or another address
        if cand.claimed_node and cand.claimed_node != ans.node:
            raise PeerRefused(f"announced node {cand.claimed_node} but proved {ans.node}")
        if cand.claimed_fingerprint and cand.claimed_fingerprint != ans.fingerprint:
            raise PeerRefused(f"announced key {cand.claimed_fingerprint} but holds {ans.fingerprint}")
        other = self.peers.get(ans.node)
        if other is not None and other.url != cand.url:
            return 2.0  # the same node reached by another address or source: keep the one we have
        state = await self.client.state(cand.url, ans.node, timeout=STATE_TIMEOUT_S)
        peer = Peer(node=ans.node, name=ans.name or ans.node, url=cand.url, host=cand.host, source=cand.source,
                    fingerprint=ans.fingerprint)
        cand.peer = peer
        self.peers[peer.node] = peer
        mesh_port = state.get("mesh_port")
        self.channel.add_peer(peer.node, cand.host, mesh_port if isinstance(mesh_port, int) else self.mesh_port)
        log.info("mesh: peer %s (%s) at %s joined via %s", peer.name, peer.node, cand.url, cand.source)
        self._update(cand, state)
        return POLL_S

    def _update(self, cand: _Candidate, state: dict[str, Any]) -> None:
        peer = cand.peer
        assert peer is not None and self.client is not None
        peer.state = state
        peer.last_seen = time.time()
        for url in state.get("peers", ()):
            if isinstance(url, str) and url.startswith("https://") and url not in self.candidates:
                host, _, port = url[len("https://"):].rpartition(":")
                if port.isdigit():
                    self.learn(host.strip("[]"), int(port))
        models = set(peer.loaded_models())
        for model in models - set(cand.upstreams):
            up = PeerUpstream(peer, model, self.client)
            cand.upstreams[model] = up
        for model in set(cand.upstreams) - models:
            del cand.upstreams[model]

    def _forget(self, cand: _Candidate, why: str = "") -> None:
        peer = cand.peer
        if peer is None:
            return
        if why:
            log.warning("mesh: dropped peer %s (%s): %s", peer.name, peer.node, why)
        peer.alive = False
        peer.gone.set()
        cand.upstreams.clear()
        cand.peer = None
        if self.peers.get(peer.node) is peer:
            del self.peers[peer.node]
            self.channel.remove_peer(peer.node)

    def upstreams(self) -> list[PeerUpstream]:
        """Every proven, live peer's models as upstreams: the router asks this on each request."""
        return [up for c in list(self.candidates.values()) if c.peer is not None and c.peer.alive
                for up in c.upstreams.values()]

    # --- what this node publishes ---------------------------------------------------------------------------

    def local_upstreams(self) -> list[Upstream]:
        """This node's own upstreams (never a peer's: a forwarded request is never forwarded again)."""
        if self._local_upstreams is not None:
            return list(self._local_upstreams())
        if self.router is None:
            return []
        return [u for u in self.router.upstreams() if u.node == "local"]

    def stored_models(self) -> list[Any]:
        """Models in this node's store (what a peer may copy), as hearth.models.store.StoredModel."""
        from ..models.store import Store

        if self._store is None:
            self._store = Store.from_config(self.config)
        try:
            return list(self._store.list())
        except (OSError, HearthError):
            return []

    def local_state(self) -> dict[str, Any]:
        """The state this node publishes to peers over the signed channel."""
        models = []
        queued = capacity = 0
        for up in self.local_upstreams():
            try:
                load = up.load()
            except Exception:  # a failing worker reports as unloaded
                continue
            queued += load.queued
            capacity += load.capacity
            entry = {"name": up.model, "loaded": load.loaded, "queued": load.queued, "capacity": load.capacity,
                     "tokens_per_second": load.tokens_per_second}
            info = getattr(up, "info", None)
            pool = getattr(info(), "pool", ()) if callable(info) else ()
            if pool:
                entry["pool"] = list(pool)  # a model this node runs across the household pool: its members
            models.append(entry)
        files = [{"name": m.name, "file": m.file, "size": m.size} for m in self.stored_models()]
        return {"node": self.node, "name": self.name, "version": hearth_version, "protocol": PROTOCOL_VERSION,
                "api_port": self.api_port, "mesh_port": self.channel.port, "models": models, "files": files, "queued": queued,
                "capacity": capacity, "uptime_s": round(time.time() - self.started_at, 1),
                "peers": sorted(p.url for p in self.peers.values() if p.alive),
                "pool": self._pool_state() if self._pool_state is not None else {}}

    def view(self) -> dict[str, Any]:
        """This node's view of the mesh (the /mesh/v1/peers answer)."""
        return {"node": self.node, "name": self.name, "household": self.household.id, "mesh_port": self.channel.port,
                "self": self.local_state(), "peers": self.peers_summary()}

    def peers_summary(self) -> list[dict[str, Any]]:
        """Every live peer, for `hearth peers`."""
        return [p.summary() for p in sorted(self.peers.values(), key=lambda p: p.name)]

    def file_sha256(self, path: Path) -> str:
        """SHA-256 of a model file, cached by (path, size, mtime) so a peer's copy costs one hash."""
        import hashlib

        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._sha_cache:
            h = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            self._sha_cache[key] = h.hexdigest()
        return self._sha_cache[key]

    def api_router(self) -> Any:
        """The one mesh route the API port keeps (the daemon includes it): /mesh/v1/peers, loopback only.

        Every other /mesh/v1 endpoint is served only on the household channel (mesh_router)."""
        from .api import make_local_router

        return make_local_router(self)

    def mesh_router(self) -> Any:
        """The FastAPI APIRouter with every /mesh/v1 endpoint, as the channel serves it."""
        from .api import make_router

        return make_router(self)


class MeshUnavailable(HearthError):
    """The mesh cannot run (no household)."""
