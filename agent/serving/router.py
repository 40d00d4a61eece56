"""The router: one path from the API to whichever upstream serves a model, local worker or peer.

Candidates for a model are the upstreams that have it, best first: loaded before not loaded, then the
most headroom, then this node before peers. The router tries them in that order while no token has
reached the client (a dead peer, a full queue, a crashed worker); once text has been sent, an error ends
the stream with an ``UpstreamError(before_first_token=False)`` the API turns into a clean end.

Upstreams come from two places: ones added with ``add_upstream`` (this node's workers) and *sources*
added with ``add_source`` (the mesh: anything with an ``upstreams()`` method, asked on every request,
so peers that come and go need no bookkeeping here).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from typing import Protocol

from .types import (
    Event,
    GenerationRequest,
    ModelInfo,
    ModelNotFound,
    QueueFull,
    TokenChunk,
    Upstream,
    UpstreamError,
)

log = logging.getLogger(__name__)


class UpstreamSource(Protocol):
    """A changing set of upstreams (the mesh's peers), asked on every request."""

    def upstreams(self) -> Iterable[Upstream]:
        """The upstreams available now."""
        ...


def _ranking(upstream: Upstream) -> tuple[bool, float, bool, float]:
    load = upstream.load()
    return (not load.loaded, -load.headroom, upstream.node != "local", -load.tokens_per_second)


MAX_TRIES = 8
"""Upstreams one request may try before the first token (each at most once)."""


class Router:
    """Routes generations and embeddings to the best upstream, failing over before the first token."""

    def __init__(self) -> None:
        self._upstreams: list[Upstream] = []
        self._sources: list[UpstreamSource] = []
        self.failovers = 0

    # --- membership ------------------------------------------------------------------------------

    def add_upstream(self, upstream: Upstream) -> None:
        """Serve through *upstream* too (a local worker, or a fixed peer)."""
        if upstream not in self._upstreams:
            self._upstreams.append(upstream)

    def remove_upstream(self, upstream: Upstream) -> None:
        """Stop routing to *upstream* (requests already streaming from it finish)."""
        if upstream in self._upstreams:
            self._upstreams.remove(upstream)

    def add_source(self, source: UpstreamSource) -> None:
        """Also route to whatever *source*.upstreams() returns at the time of each request."""
        self._sources.append(source)

    def remove_source(self, source: UpstreamSource) -> None:
        """Forget a source added with add_source."""
        if source in self._sources:
            self._sources.remove(source)

    def upstreams(self) -> list[Upstream]:
        """Every upstream right now: this node's first, then each source's."""
        found = list(self._upstreams)
        for source in self._sources:
            try:
                found.extend(source.upstreams())
            except Exception:  # a broken source must not take routing down
                log.exception("upstream source %r failed", source)
        return found

    def candidates(self, model: str, hops: int = 0) -> list[Upstream]:
        """Upstreams that have *model*, best first; a request that already hopped stays local."""
        found = [u for u in self.upstreams() if u.model == model and (hops == 0 or u.node == "local")]
        return sorted(found, key=_ranking)

    # --- the Router protocol ---------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """Every model served, merged across nodes (local facts win; nodes are unioned)."""
        merged: dict[str, ModelInfo] = {}
        for upstream in self.upstreams():
            info_fn = getattr(upstream, "info", None)
            info = info_fn() if callable(info_fn) else None
            if not isinstance(info, ModelInfo):
                info = ModelInfo(name=upstream.model, nodes=(upstream.node,), loaded=upstream.load().loaded)
            old = merged.get(info.name)
            if old is None:
                merged[info.name] = info
                continue
            nodes = tuple(dict.fromkeys(old.nodes + info.nodes))
            base, other = (info, old) if upstream.node == "local" else (old, info)
            merged[info.name] = ModelInfo(
                name=base.name, nodes=nodes, loaded=old.loaded or info.loaded,
                context_length=base.context_length or other.context_length,
                size_bytes=base.size_bytes or other.size_bytes, can_embed=base.can_embed or other.can_embed,
                family=base.family or other.family, quantization=base.quantization or other.quantization,
                tools=base.tools or other.tools, slots=base.slots or other.slots, pool=base.pool or other.pool)
        return sorted(merged.values(), key=lambda m: m.name)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream from the best upstream, failing over while no text has been sent."""
        candidates = self.candidates(request.model, request.hops)
        if not candidates:
            raise ModelNotFound(request.model)
        last: UpstreamError | None = None
        tried: list[Upstream] = []
        while candidates and len(tried) < MAX_TRIES:
            upstream = candidates.pop(0)
            tried.append(upstream)
            sent = False
            stream = upstream.generate(request)
            try:
                async for event in stream:
                    if isinstance(event, TokenChunk):
                        sent = True
                    yield event
                return
            except UpstreamError as e:
                if sent or not e.before_first_token:
                    raise UpstreamError(e.message, status=e.status, hint=e.hint, before_first_token=False) from None
                if 400 <= e.status < 500 and not isinstance(e, QueueFull):
                    raise  # the request itself is wrong: every upstream would say so
                last = e
            except Exception as e:  # an upstream bug: contain it like a failure
                log.exception("upstream %s failed for %s", upstream.node, request.model)
                if sent:
                    raise UpstreamError(f"the generation failed: {e}", status=502, before_first_token=False) from None
                last = UpstreamError(f"node {upstream.node} failed: {e}", status=502)
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
            self.failovers += 1
            log.info("request %s: %s failed before the first token (%s); trying the next", request.request_id,
                     upstream.node, last.message if last else "?")
            if not candidates:
                # An upstream that replaced one while this request waited on it (a pool torn down and forming
                # again leaves its waiting stand-in) is tried too: nothing was sent, the request is as new.
                candidates = [u for u in self.candidates(request.model, request.hops) if u not in tried]
        raise _best_error(last, request.model)

    async def embed(self, model: str, inputs: list[str]) -> tuple[list[list[float]], int]:
        """Embeddings from the best upstream that has the model, failing over on 5xx and 429."""
        candidates = self.candidates(model)
        if not candidates:
            raise ModelNotFound(model)
        last: UpstreamError | None = None
        for upstream in candidates:
            try:
                return await upstream.embed(model, inputs)
            except UpstreamError as e:
                if 400 <= e.status < 500 and not isinstance(e, QueueFull):
                    raise
                last = e
        raise _best_error(last, model)


def _best_error(last: UpstreamError | None, model: str) -> UpstreamError:
    if last is None:
        return UpstreamError(f"no node could serve model '{model}'", status=503, retry_after=1.0)
    return last
