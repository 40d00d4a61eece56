"""Peers of this node and the upstream that streams a generation from one of them."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..serving.types import (
    Event,
    Finished,
    GenerationRequest,
    ModelInfo,
    QueueFull,
    TokenChunk,
    UpstreamError,
    UpstreamLoad,
)
from .client import PIN, MeshClient

log = logging.getLogger(__name__)

FIRST_TOKEN_TIMEOUT_S = 120.0
"""Longest silence before a peer's first event. A working peer sends a "working" line every few seconds
(hearth.mesh.api.HEARTBEAT_S), so only a stuck (or much older) peer reaches it, however slow its prompt."""
NEXT_TOKEN_TIMEOUT_S = 20.0
"""Longest silence between two events of a running generation before the client gets an error."""


@dataclass
class Peer:
    """A household node that proved itself: who it is, where it is, and what it last published."""

    node: str
    name: str
    url: str
    host: str
    source: str
    """'mdns' or 'manual'."""
    fingerprint: str = ""
    state: dict[str, Any] = field(default_factory=dict)
    last_seen: float = 0.0
    """time.time() of the last good state answer."""
    alive: bool = True
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the peer is dropped, so streams from it end at once instead of waiting for a timeout."""

    def model_state(self, model: str) -> dict[str, Any] | None:
        """What the peer published about *model*, or None."""
        for m in self.state.get("models", ()):
            if m.get("name") == model:
                return m
        return None

    def loaded_models(self) -> list[str]:
        """Models it has loaded (those it can serve now)."""
        return [m["name"] for m in self.state.get("models", ()) if m.get("loaded") and m.get("name")]

    def summary(self) -> dict[str, Any]:
        """The row `hearth peers` shows."""
        return {"node": self.node, "name": self.name, "host": self.host, "url": self.url, "source": self.source,
                "models": self.loaded_models(), "files": sorted({n for f in self.state.get("files", ()) for n in (f.get("name"), f.get("file")) if n}),
                "queued": self.state.get("queued", 0), "capacity": self.state.get("capacity", 0),
                "version": self.state.get("version", ""), "last_seen": self.last_seen,
                "age_s": round(time.time() - self.last_seen, 1) if self.last_seen else None, "alive": self.alive,
                "pool": self.pool_summary()}

    def pool_summary(self) -> dict[str, Any]:
        """What the peer offers the household pool and the pooled models it runs: {offered, devices, pooled}."""
        raw = self.state.get("pool")
        offer = raw if isinstance(raw, dict) else {}
        devices = [d for d in offer.get("devices") or () if isinstance(d, dict)]
        pooled = {m.get("name"): m.get("pool") for m in self.state.get("models", ()) if isinstance(m, dict) and m.get("pool")}
        return {"offered": sum(int(d.get("bytes") or 0) for d in devices),
                "devices": [str(d.get("name")) for d in devices], "ready": bool(offer.get("rpc_ready")),
                "pooled": pooled}


class PeerUpstream:
    """One model on one peer, as an Upstream: streams a GenerationRequest from /mesh/v1/generate over the
    household channel (the answer's certificate must be that peer's)."""

    def __init__(self, peer: Peer, model: str, client: MeshClient) -> None:
        self.peer = peer
        self.node = peer.node
        self.model = model
        self.client = client
        self.inflight = 0
        """Requests this node is streaming from the peer now: the published queue lags by up to a poll,
        so without them a burst of requests would all pick the same peer."""

    def __repr__(self) -> str:
        return f"PeerUpstream({self.peer.name}/{self.node}, {self.model})"

    def load(self) -> UpstreamLoad:
        """The load the peer last published for this model."""
        m = self.peer.model_state(self.model) or {}
        queued = max(int(m.get("queued", 0)), self.inflight)
        return UpstreamLoad(queued=queued, capacity=int(m.get("capacity", 1)),
                            tokens_per_second=float(m.get("tokens_per_second", 0.0)), loaded=bool(m.get("loaded")))

    def info(self) -> ModelInfo:
        """What /v1/models says about the peer's model (a pooled one with its members)."""
        m = self.peer.model_state(self.model) or {}
        pool = m.get("pool")
        return ModelInfo(name=self.model, nodes=(self.node,), loaded=bool(m.get("loaded")),
                         pool=tuple(str(p) for p in pool) if isinstance(pool, list) else ())

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream from the peer. Before the first token every failure says before_first_token=True (so the
        router tries the next upstream); after it, the stream ends with an UpstreamError, never a hang."""
        if not self.peer.alive:
            raise UpstreamError(f"peer {self.peer.name} is gone", before_first_token=True)
        data = request.to_json()
        data["hops"] = request.hops + 1
        body = json.dumps(data).encode()
        url = self.peer.url + "/mesh/v1/generate"
        headers = self.client.headers("POST", url, body) | {"Content-Type": "application/json"}
        got_token = False
        timeout = httpx.Timeout(connect=2.0, read=None, write=5.0, pool=2.0)
        self.inflight += 1
        try:
            async with self.client.http.stream("POST", url, content=body, headers=headers, timeout=timeout,
                                               extensions={PIN: self.node}) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise _error_from_answer(self.peer.name, resp)
                lines = resp.aiter_lines()
                while True:
                    line = await self._next(lines, NEXT_TOKEN_TIMEOUT_S if got_token else FIRST_TOKEN_TIMEOUT_S)
                    if line is None:
                        raise UpstreamError(f"peer {self.peer.name} ended the stream early",
                                            before_first_token=not got_token)
                    if not line.strip():
                        continue
                    ev = json.loads(line)
                    kind = ev.get("type")
                    if kind == "token":
                        got_token = True
                        yield TokenChunk.from_json({**ev, "t": ev["text"]})
                    elif kind == "finished":
                        yield Finished(ev.get("finish_reason", "stop"), int(ev.get("prompt_tokens", 0)),
                                       int(ev.get("completion_tokens", 0)), served_by=ev.get("served_by") or self.node)
                        return
                    elif kind == "error":
                        if int(ev.get("status", 502)) == 429 and not got_token:
                            raise QueueFull(self.model, retry_after=float(ev.get("retry_after") or 1.0))
                        raise UpstreamError(f"peer {self.peer.name}: {ev.get('message', 'error')}",
                                            status=int(ev.get("status", 502)), before_first_token=not got_token)
        except httpx.HTTPError as e:
            raise UpstreamError(f"peer {self.peer.name} failed: {type(e).__name__} {e}".strip(), status=502,
                                before_first_token=not got_token) from None
        except (ValueError, KeyError) as e:
            raise UpstreamError(f"peer {self.peer.name} sent a bad event: {e}", status=502,
                                before_first_token=not got_token) from None
        finally:
            self.inflight -= 1

    async def _next(self, lines: AsyncIterator[str], limit: float) -> str | None:
        """The next line, or an UpstreamError when the peer is dropped or silent for *limit* seconds."""
        nxt = asyncio.ensure_future(lines.__anext__())
        gone = asyncio.ensure_future(self.peer.gone.wait())
        try:
            done, _ = await asyncio.wait({nxt, gone}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if nxt in done:
            try:
                return nxt.result()
            except StopAsyncIteration:
                return None
        nxt.cancel()
        why = "was dropped from the mesh" if self.peer.gone.is_set() else f"sent nothing for {limit:.0f} s"
        raise httpx.ReadTimeout(f"peer {why}")

    async def embed(self, model: str, inputs: list[str]) -> tuple[list[list[float]], int]:
        """Embeddings from the peer's /mesh/v1/embed."""
        body = json.dumps({"model": model, "input": inputs}).encode()
        url = self.peer.url + "/mesh/v1/embed"
        headers = self.client.headers("POST", url, body) | {"Content-Type": "application/json"}
        try:
            resp = await self.client.http.post(url, content=body, headers=headers, timeout=60.0,
                                               extensions={PIN: self.node})
        except httpx.HTTPError as e:
            raise UpstreamError(f"peer {self.peer.name} failed: {e}", status=502) from None
        if resp.status_code != 200:
            raise _error_from_answer(self.peer.name, resp)
        data = resp.json()
        return data["embeddings"], int(data.get("prompt_tokens", 0))


def _error_from_answer(name: str, resp: httpx.Response) -> UpstreamError:
    try:
        message = resp.json().get("message") or resp.text
    except ValueError:
        message = resp.text
    if resp.status_code == 429:
        err = QueueFull(name, retry_after=float(resp.headers.get("Retry-After", 1)))
        err.message = f"peer {name}: {message}"
        return err
    return UpstreamError(f"peer {name} answered {resp.status_code}: {message}", status=resp.status_code,
                         before_first_token=True)
