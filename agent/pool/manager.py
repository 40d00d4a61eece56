"""Forms and keeps this node's pooled models: plan, connect to the members, run ``llama-server --rpc``,
serve it through the router like any local model, and re-form when a member leaves.

A pooled model's llama-server is an ordinary supervised server (hearth.serving.llamaserver) whose
``--rpc`` endpoints are loopback addresses: this node's own rpc-server, and for each peer a forward
through the mesh's encrypted channel (``channel.forward(node, "rpc")``). When a member goes (its
rpc-server dies, or the mesh drops the node) the RPC connection breaks, llama-server stops, and a stream in
progress ends with a clean error at once (never a hang); this manager then tears the pool down and plans
again from the offers still standing. While no pool can be formed, the model stays listed as not loaded
and a request for it gets a 503 saying why, so the router prefers any node that can serve it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import HearthError
from ..serving.local import Pool, ServerUpstream
from ..serving.types import Event, GenerationRequest, ModelInfo, UpstreamError, UpstreamLoad
from .capacity import Offer, unclaimed
from .plan import ModelLayout, Plan, PoolTooSmall, layout_from_gguf, plan

log = logging.getLogger(__name__)

RETRY_S = 2.0
"""How often a pool that cannot form (not enough memory offered, a member unreachable) is tried again."""
WATCH_S = 0.25
"""How often a formed pool's members are checked against the offers."""
REFORM_WAIT_S = 30.0
"""How long a request waits for a pool that was formed before and is forming again."""
MAX_RESTARTS = 3
"""llama-server restarts (member rpc-servers restarting, a broken connection) before the pool re-forms."""


class Endpoint(Protocol):
    """A member's rpc-server as this node reaches it: a loopback address, closed when the pool goes."""

    address: str

    async def aclose(self) -> None:
        """Stop relaying to the member."""
        ...


Connector = Callable[[str], Awaitable[Endpoint]]
"""node id -> an endpoint for that node's rpc-server (its own, or a channel forward to a peer's)."""


@dataclass
class LocalEndpoint:
    """An rpc-server on this node (or any loopback address): nothing to open or close."""

    address: str

    async def aclose(self) -> None:
        """Nothing to close."""


class PoolUnavailable(HearthError):
    """A member cannot be reached for the pool (no channel, the peer refused)."""


class PooledUpstream(ServerUpstream):
    """A pooled model's llama-server as an upstream: /v1/models and /health show its members."""

    members: tuple[str, ...] = ()

    def info(self) -> ModelInfo:
        """What /v1/models says, with the pool's member names."""
        return dataclasses.replace(super().info(), pool=self.members)


class WaitingUpstream:
    """A pooled model that has no pool right now: listed as not loaded. A request waits a while for a pool
    that is forming again (a member's rpc-server restarting), then gets a 503 saying why; the router tries
    every loaded upstream for the model first."""

    node = "local"

    def __init__(self, model: str, pooled: PooledModel, wait_s: float = REFORM_WAIT_S) -> None:
        self.model = model
        self.pooled = pooled
        self.wait_s = wait_s

    def load(self) -> UpstreamLoad:
        """Never loaded: ranked after any node that serves the model."""
        return UpstreamLoad(queued=0, capacity=1, loaded=False)

    def info(self) -> ModelInfo:
        """Listed, not loaded."""
        return ModelInfo(name=self.model, nodes=("local",), loaded=False)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """The re-formed pool's answer, or a 503 with the reason the pool is not formed."""
        pm = self.pooled
        if pm.formed and self.wait_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pm.ready.wait(), self.wait_s)
            if pm.upstream is not None and pm.state == "ready":
                async for event in pm.upstream.generate(request):
                    yield event
                return
        raise UpstreamError(f"model '{self.model}' runs across the household pool, which is not formed: "
                            f"{pm.reason}", status=503, retry_after=5.0)

    async def embed(self, model: str, inputs: list[str]) -> tuple[list[list[float]], int]:
        """Pooled models serve generation only."""
        raise UpstreamError(f"model '{self.model}' does not provide embeddings", status=400)


@dataclass
class PooledModel:
    """One model this node runs across the pool, and how it stands."""

    name: str
    path: Path
    options: dict[str, Any]
    state: str = "waiting"
    """'waiting' (not enough memory offered, or a member unreachable), 'forming', 'ready' or 'stopped'."""
    reason: str = "not planned yet"
    plan: Plan | None = None
    upstream: PooledUpstream | None = None
    endpoints: list[Endpoint] = field(default_factory=list)
    waiting: WaitingUpstream | None = None
    task: asyncio.Task[None] | None = None
    formed: int = 0
    """How many times the pool was formed (1 + re-forms)."""
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while the pool serves."""

    def to_dict(self) -> dict[str, Any]:
        """For /health and ``hearth status``."""
        members = [{"node": s.node, "name": s.name, "device": s.device, "layers": s.layers, "output": s.output,
                    "bytes": s.bytes} for s in (self.plan.shares if self.plan else ())]
        # What crossed the channel to each peer member (a channel Forward counts it; the head's own member
        # is on loopback and counts nothing).
        moved = sum(int(getattr(ep, "bytes_in", 0)) + int(getattr(ep, "bytes_out", 0)) for ep in self.endpoints)
        return {"state": self.state, "reason": self.reason if self.state != "ready" else "",
                "members": members, "formed": self.formed, "channel_bytes": moved}


def _pool_offload(plan: Plan) -> dict[str, Any]:
    """Where a pooled model's layers are, in the form llama-server's load report has (hearth status, the
    GPU-idle warning): every layer on the members' devices, none on this node's CPU."""
    total = sum(s.split for s in plan.shares)
    return {"backend": "household pool", "devices_used": [f"{s.name} {s.device}" for s in plan.shares],
            "layers_offloaded": total, "layers_total": total, "devices": [], "weights_mib": {},
            "cpu_variant": None}


class PoolManager:
    """Keeps this node's pooled models formed from the household's offers (*offers*, asked each time)."""

    def __init__(self, serving: Pool, router: Any, offers: Callable[[], Sequence[Offer]], connect: Connector,
                 *, self_node: str = "local", retry_s: float = RETRY_S, reform_wait_s: float = REFORM_WAIT_S,
                 settle_s: float = 0.0) -> None:
        self.serving = serving
        self.router = router
        self.offers = offers
        self.connect = connect
        self.self_node = self_node
        self.retry_s = retry_s
        self.reform_wait_s = reform_wait_s
        self.settle_s = settle_s
        """Before its first pool, the manager waits until the household's offers have not changed for this long
        (discovery is still finding nodes when the agent starts: a pool formed from the first peer heard
        would leave out a bigger one that answers a second later)."""
        self._settled = settle_s <= 0
        self.models: dict[str, PooledModel] = {}

    def keep(self, name: str, path: Path, **options: Any) -> PooledModel:
        """Run *name* (the GGUF at *path*) across the pool from now on, forming it as soon as it can."""
        pm = self.models.get(name)
        if pm is None:
            pm = PooledModel(name, Path(path), options)
            self.models[name] = pm
            pm.waiting = WaitingUpstream(name, pm, self.reform_wait_s)
            self.router.add_upstream(pm.waiting)
            pm.task = asyncio.get_running_loop().create_task(self._keep(pm), name=f"pool:{name}")
        return pm

    def ready(self) -> tuple[str, ...]:
        """The pooled models being served now."""
        return tuple(n for n, pm in self.models.items() if pm.state == "ready")

    def heading(self) -> tuple[str, ...]:
        """The pooled models this node heads, waiting, forming or serving (its offer's ``serving``: a peer
        that sees one there leaves that model to this node)."""
        return tuple(n for n, pm in self.models.items() if pm.state != "stopped")

    async def drop(self, name: str) -> bool:
        """Stop running *name* across the pool: its llama-server, its forwards and its stand-in in the router
        go, the members are free again. False when this node does not keep it."""
        pm = self.models.pop(name, None)
        if pm is None:
            return False
        await self._end(pm)
        log.info("pool: %s is no longer run across the pool from this node", name)
        return True

    def members(self) -> tuple[str, ...]:
        """The nodes this node's pools hold now (forming or serving), for its offer's ``members``."""
        return tuple(dict.fromkeys(n for pm in self.models.values() if pm.plan is not None
                                   and pm.state in ("forming", "ready") for n in pm.plan.members))

    def status(self) -> dict[str, Any]:
        """Every pooled model's state and members."""
        return {n: pm.to_dict() for n, pm in self.models.items()}

    async def _settle(self) -> None:
        """Wait until the set of nodes offering memory has been the same for settle_s (at most 5 × settle_s)."""
        loop = asyncio.get_running_loop()
        start = stable = loop.time()
        seen = {o.node for o in self.offers()}
        while loop.time() - stable < self.settle_s and loop.time() - start < 5 * self.settle_s:
            await asyncio.sleep(min(0.25, self.settle_s))
            now = {o.node for o in self.offers()}
            if now != seen:
                seen, stable = now, loop.time()
        self._settled = True

    async def _keep(self, pm: PooledModel) -> None:
        layout: ModelLayout | None = None
        said = ""
        if not self._settled:
            await self._settle()
        while True:
            try:
                if layout is None:
                    context = int(pm.options.get("context") or 4096) * max(1, int(pm.options.get("slots") or 1))
                    layout = await asyncio.to_thread(layout_from_gguf, pm.path, context)
                pm.plan = plan(layout, unclaimed(self.offers(), self.self_node), prefer=self.self_node)
                why = await self._serve(pm)
            except (PoolTooSmall, PoolUnavailable) as e:
                pm.state, pm.reason, pm.plan = "waiting", e.message, None
                if e.message != said:  # said once, not every retry
                    log.warning("pool: %s waits: %s", pm.name, e.message)
                    said = e.message
                await asyncio.sleep(self.retry_s)
                continue
            except HearthError as e:  # an unreadable model file: say so and keep trying (it may be replaced)
                pm.state, pm.reason = "waiting", e.message
                log.error("pool: %s: %s", pm.name, e.message)
                await asyncio.sleep(self.retry_s * 5)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a member gone between plan and start, a bug: the pool must keep trying
                pm.state, pm.reason = "waiting", f"forming failed: {e}"
                log.exception("pool: forming %s failed", pm.name)
                await asyncio.sleep(self.retry_s)
                continue
            said = ""
            log.warning("pool: %s re-forms: %s", pm.name, why)
            served = pm.state == "ready"
            pm.state, pm.reason = "waiting", why
            if not served:  # it broke before it ever served: do not spin on a pool that cannot load
                await asyncio.sleep(self.retry_s * 5)

    async def _serve(self, pm: PooledModel) -> str:
        """Connect to the plan's members, run the pooled llama-server until the pool breaks; returns why."""
        assert pm.plan is not None
        offers = {o.node: o for o in self.offers()}
        gone = [n for n in pm.plan.members if n not in offers]
        if gone:
            raise PoolUnavailable(f"member {gone[0]} left while the pool was forming")
        pm.state, pm.reason = "forming", "connecting to the members"
        endpoints: list[Endpoint] = []
        try:
            for node in pm.plan.members:
                try:
                    endpoints.append(await self.connect(node))
                except HearthError as e:
                    raise PoolUnavailable(f"cannot reach {offers[node].name}'s rpc-server: {e.message}") from None
            base, index = 0, {}
            for node in pm.plan.members:
                for j, dev in enumerate(offers[node].devices):
                    index[(node, dev.name)] = base + j
                base += len(offers[node].devices)
            options = dict(pm.options, gpu_layers=-1, rpc=tuple(e.address for e in endpoints),
                           rpc_devices=tuple(index[(s.node, s.device)] for s in pm.plan.shares),
                           tensor_split=pm.plan.tensor_split)
            upstream = self.serving.add(pm.name, pm.path, upstream_type=PooledUpstream, **options)
            assert isinstance(upstream, PooledUpstream)
            upstream.members = tuple(dict.fromkeys(s.name for s in pm.plan.shares))
            pm.upstream, pm.endpoints = upstream, endpoints
            pm.formed += 1
            log.info("pool: %s across %s", pm.name, pm.plan.describe())
            self.router.add_upstream(upstream)
            if pm.waiting is not None:
                self.router.remove_upstream(pm.waiting)
            return await self._watch(pm, upstream)
        finally:
            await self._teardown(pm, endpoints)

    async def _watch(self, pm: PooledModel, upstream: PooledUpstream) -> str:
        assert pm.plan is not None
        worker = upstream.worker
        while True:
            if worker.state == "ready":
                if (worker.info.get("offload") or {}).get("backend") != "household pool":  # after each (re)start
                    worker.info["offload"] = _pool_offload(pm.plan)
                pm.state = "ready"
                pm.ready.set()
            current = {o.node: o for o in self.offers()}
            for share in pm.plan.shares:
                offer = current.get(share.node)
                if offer is None or not offer.rpc_ready:
                    return f"member {share.name} left"
            if worker.restarts >= MAX_RESTARTS and worker.state != "ready":
                return f"its llama-server keeps failing ({worker.error})"
            await asyncio.sleep(WATCH_S)

    async def _teardown(self, pm: PooledModel, endpoints: list[Endpoint]) -> None:
        pm.ready.clear()
        if pm.waiting is not None and pm.state != "stopped":
            self.router.add_upstream(pm.waiting)
        if pm.upstream is not None:
            self.router.remove_upstream(pm.upstream)
            await self.serving.remove(pm.name)
            pm.upstream = None
        for ep in endpoints:
            with contextlib.suppress(Exception):
                await ep.aclose()
        pm.endpoints = []

    async def stop(self) -> None:
        """Stop every pooled model (its llama-server and its forwards)."""
        for pm in self.models.values():
            await self._end(pm)

    async def _end(self, pm: PooledModel) -> None:
        """Stop one pooled model: its keeper task (which tears its llama-server and forwards down) and its
        stand-in in the router."""
        pm.state = "stopped"  # before the teardown: it must not put the stand-in back
        if pm.task is not None:
            pm.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pm.task
        if pm.waiting is not None:
            self.router.remove_upstream(pm.waiting)
