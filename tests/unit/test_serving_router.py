"""The router: candidate order, failover before the first token, a clean error after it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from hearth.serving.router import Router
from hearth.serving.types import (
    Event,
    Finished,
    GenerationRequest,
    ModelInfo,
    ModelNotFound,
    QueueFull,
    TokenChunk,
    UpstreamError,
    UpstreamLoad,
)


class FakeUpstream:
    """An upstream that yields *tokens* then fails with *error* (or finishes)."""

    def __init__(self, node: str, model: str = "m", *, queued: int = 0, capacity: int = 4, loaded: bool = True,
                 tokens: tuple[str, ...] = ("a", "b"), error: UpstreamError | None = None,
                 fail_after: int | None = None) -> None:
        self.node, self.model = node, model
        self._load = UpstreamLoad(queued=queued, capacity=capacity, loaded=loaded)
        self.tokens, self.error, self.fail_after = tokens, error, fail_after
        self.calls = 0
        self.closed = False

    def load(self) -> UpstreamLoad:
        return self._load

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        self.calls += 1
        try:
            for i, t in enumerate(self.tokens):
                if self.error is not None and self.fail_after == i:
                    if i == 0:
                        raise self.error
                    raise UpstreamError(self.error.message, status=self.error.status, before_first_token=i == 0)
                yield TokenChunk(t)
            if self.error is not None and self.fail_after is None:
                raise self.error
            yield Finished("stop", 3, len(self.tokens), served_by=self.node)
        finally:
            self.closed = True

    async def embed(self, model: str, inputs: list[str]) -> tuple[list[list[float]], int]:
        if self.error is not None:
            raise self.error
        return [[1.0] for _ in inputs], len(inputs)


def req(model: str = "m") -> GenerationRequest:
    return GenerationRequest(model=model, kind="completion", prompt="hi")


async def collect(router: Router, request: GenerationRequest) -> list[Event]:
    return [e async for e in router.generate(request)]


def test_candidates_loaded_first_then_headroom_then_local() -> None:
    r = Router()
    busy_local = FakeUpstream("local", queued=3)
    idle_peer = FakeUpstream("peer1", queued=0)
    idle_peer2 = FakeUpstream("peer2", queued=0)
    idle_local = FakeUpstream("local", queued=0)
    cold_peer = FakeUpstream("peer3", loaded=False)
    other = FakeUpstream("local", model="other")
    for u in (busy_local, idle_peer, cold_peer, idle_peer2, other):
        r.add_upstream(u)
    r.add_source(type("Src", (), {"upstreams": lambda self: [idle_local]})())
    assert r.candidates("m") == [idle_local, idle_peer, idle_peer2, busy_local, cold_peer]
    assert r.candidates("m", hops=1) == [idle_local, busy_local]


async def test_unknown_model_is_model_not_found() -> None:
    r = Router()
    r.add_upstream(FakeUpstream("local"))
    with pytest.raises(ModelNotFound):
        await collect(r, req("nope"))
    with pytest.raises(ModelNotFound):
        await r.embed("nope", ["x"])


async def test_fails_over_before_first_token() -> None:
    r = Router()
    dead = FakeUpstream("local", error=UpstreamError("worker died", status=503), fail_after=0)
    good = FakeUpstream("peer", queued=1)
    r.add_upstream(dead)
    r.add_upstream(good)
    events = await collect(r, req())
    assert [e.text for e in events if isinstance(e, TokenChunk)] == ["a", "b"]
    assert isinstance(events[-1], Finished) and events[-1].served_by == "peer"
    assert dead.calls == 1 and dead.closed and r.failovers == 1


async def test_queue_full_everywhere_is_queue_full() -> None:
    r = Router()
    r.add_upstream(FakeUpstream("local", error=QueueFull("m", retry_after=3), fail_after=0))
    r.add_upstream(FakeUpstream("peer", error=QueueFull("m", retry_after=2), fail_after=0))
    with pytest.raises(QueueFull) as info:
        await collect(r, req())
    assert info.value.status == 429 and info.value.retry_after is not None


async def test_client_error_does_not_fail_over() -> None:
    r = Router()
    bad = FakeUpstream("local", error=UpstreamError("prompt too long", status=400), fail_after=0)
    other = FakeUpstream("peer", queued=1)
    r.add_upstream(bad)
    r.add_upstream(other)
    with pytest.raises(UpstreamError) as info:
        await collect(r, req())
    assert info.value.status == 400 and other.calls == 0


async def test_error_after_first_token_ends_stream_without_failover() -> None:
    r = Router()
    flaky = FakeUpstream("local", tokens=("a", "b", "c"), error=UpstreamError("worker died"), fail_after=2)
    backup = FakeUpstream("peer", queued=1)
    r.add_upstream(flaky)
    r.add_upstream(backup)
    got: list[str] = []
    with pytest.raises(UpstreamError) as info:
        async for e in r.generate(req()):
            if isinstance(e, TokenChunk):
                got.append(e.text)
    assert got == ["a", "b"]
    assert info.value.before_first_token is False
    assert backup.calls == 0


async def test_closing_the_router_stream_closes_the_upstream() -> None:
    r = Router()
    up = FakeUpstream("local", tokens=("a", "b", "c"))
    r.add_upstream(up)
    stream = r.generate(req())
    first = await stream.__anext__()
    assert first == TokenChunk("a")
    await stream.aclose()  # type: ignore[attr-defined]
    assert up.closed


async def test_embed_fails_over_on_5xx_but_not_400() -> None:
    r = Router()
    r.add_upstream(FakeUpstream("local", error=UpstreamError("down", status=503)))
    r.add_upstream(FakeUpstream("peer", queued=1))
    vectors, n = await r.embed("m", ["x", "y"])
    assert vectors == [[1.0], [1.0]] and n == 2
    r2 = Router()
    r2.add_upstream(FakeUpstream("local", error=UpstreamError("cannot embed", status=400)))
    r2.add_upstream(FakeUpstream("peer", queued=1))
    with pytest.raises(UpstreamError) as info:
        await r2.embed("m", ["x"])
    assert info.value.status == 400


def test_models_merge_across_nodes() -> None:
    class WithInfo(FakeUpstream):
        def info(self) -> ModelInfo:
            return ModelInfo(name=self.model, nodes=(self.node,), context_length=2048 if self.node == "local" else 0,
                             quantization="Q4_K_M")

    r = Router()
    r.add_upstream(FakeUpstream("peer1", model="m", loaded=False))
    r.add_upstream(WithInfo("local", model="m"))
    r.add_upstream(FakeUpstream("peer2", model="z"))
    models = {m.name: m for m in r.models()}
    assert set(models) == {"m", "z"}
    assert set(models["m"].nodes) == {"local", "peer1"}
    assert models["m"].context_length == 2048 and models["m"].loaded and models["m"].quantization == "Q4_K_M"
    assert models["z"].nodes == ("peer2",)
    r.remove_upstream(r.upstreams()[2])
    assert [m.name for m in r.models()] == ["m"]


async def test_an_upstream_that_replaced_the_one_tried_is_tried_too() -> None:
    """A pool torn down while a request waited on it (its member died) is replaced in the router by its
    waiting stand-in: the request, which has sent nothing, goes there instead of failing."""
    r = Router()
    replacement = FakeUpstream("local", tokens=("again",))

    class Replaced(FakeUpstream):
        async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
            r.remove_upstream(self)
            r.add_upstream(replacement)
            raise UpstreamError("model 'm' is not ready yet", status=503)
            yield  # an async generator

    gone = Replaced("local")
    r.add_upstream(gone)
    events = await collect(r, req())
    assert [e.text for e in events if isinstance(e, TokenChunk)] == ["again"] and replacement.calls == 1
    assert r.failovers == 1

    # Each upstream is tried once: one that fails and puts itself back is not retried forever.
    class Stubborn(FakeUpstream):
        async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
            self.calls += 1
            r.remove_upstream(self)
            r.add_upstream(self)
            raise UpstreamError("down", status=503)
            yield

    r2 = Router()
    stubborn = Stubborn("local")
    r = r2
    r.add_upstream(stubborn)
    with pytest.raises(UpstreamError):
        await collect(r, req())
    assert stubborn.calls == 1
