"""The model worker with real llama-cpp-python: generation, stops, limits, crash recovery, cancellation."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from hearth.serving.engine import BadRequest, Engine, LoadOptions
from hearth.serving.pool import Backoff, LocalUpstream, WorkerProcess, WorkerSpec
from hearth.serving.types import Finished, GenerationRequest, TokenChunk, UpstreamError

GREEDY = {"temperature": 0.0, "top_k": 40, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0, "seed": 1}


def completion(prompt: str, **kw: Any) -> GenerationRequest:
    return GenerationRequest(model="m", kind="completion", prompt=prompt, **{**GREEDY, **kw})


def run(engine: Engine, request: GenerationRequest) -> tuple[str, Finished]:
    pieces = list(engine.stream(request))
    end = pieces[-1]
    assert isinstance(end, Finished)
    return "".join(p for p in pieces if isinstance(p, str)), end


@pytest.fixture(scope="module")
def gemma_engine(gemma_path: Path, llama_runtime: Any) -> Engine:
    return Engine.load(gemma_path, LoadOptions(context=512, threads=2, chat_format="gemma"), name="gemma")


@pytest.fixture(scope="module")
def tiny_engine(tiny_gguf: Path, llama_runtime: Any) -> Engine:
    return Engine.load(tiny_gguf, LoadOptions(threads=1), name="tiny")


def test_gemma_generates_counts_and_reports_offload(gemma_engine: Engine) -> None:
    text, end = run(gemma_engine, completion("The capital of France is the city of", max_tokens=12))
    assert "Paris" in text
    assert end.finish_reason == "length" and end.completion_tokens == 12 and end.prompt_tokens >= 5
    info = gemma_engine.info()
    off = info["offload"]
    assert off["layers_total"] > 0 and 0 <= off["layers_offloaded"] <= off["layers_total"]
    assert any(d["type"] == "cpu" for d in off["devices"])
    assert info["quantization"] == "Q4_K_M" and info["context_length"] == 512 and info["family"].startswith("gemma")


def test_seed_makes_sampling_repeatable(gemma_engine: Engine) -> None:
    req = completion("Once upon a time", max_tokens=16, temperature=0.9, seed=1234)
    assert run(gemma_engine, req)[0] == run(gemma_engine, req)[0]


def test_stop_string_cuts_text_without_partial_stop(gemma_engine: Engine) -> None:
    full, _ = run(gemma_engine, completion("The capital of France is the city of", max_tokens=24))
    stop = full[8:12]
    assert stop.strip()
    text, end = run(gemma_engine, completion("The capital of France is the city of", max_tokens=24, stop=(stop,)))
    assert text == full[: full.index(stop)] and end.finish_reason == "stop"


def test_chat_with_gemma_format(gemma_engine: Engine) -> None:
    req = GenerationRequest(model="m", kind="chat", messages=({"role": "user", "content": "Say hello."},),
                            max_tokens=8, **GREEDY)
    text, end = run(gemma_engine, req)
    assert end.completion_tokens >= 1 and end.prompt_tokens > 5


def test_embeddings_on_a_generative_model_are_a_400(gemma_engine: Engine) -> None:
    with pytest.raises(BadRequest) as info:
        gemma_engine.embed(["hello"])
    assert info.value.status == 400 and "embeddings" in info.value.message


def test_prompt_longer_than_context_is_a_400(tiny_engine: Engine) -> None:
    with pytest.raises(BadRequest) as info:
        list(tiny_engine.stream(completion("hello world " * 400)))
    assert info.value.status == 400 and "context holds 256" in info.value.message


def test_tiny_model_chat_template_and_context_limit(tiny_engine: Engine) -> None:
    req = GenerationRequest(model="m", kind="chat", messages=({"role": "user", "content": "hello"},), **GREEDY)
    text, end = run(tiny_engine, req)
    # Without max_tokens a generation may use the rest of the context and no more.
    assert end.prompt_tokens + end.completion_tokens <= 256 and end.finish_reason in ("length", "stop")
    assert text


def test_cancel_stops_within_a_token(tiny_engine: Engine) -> None:
    calls = {"n": 0}

    def cancelled() -> bool:
        calls["n"] += 1
        return calls["n"] >= 3

    _, end = run(tiny_engine, completion("hello", max_tokens=100))
    assert end.completion_tokens == 100  # the model does run that long
    pieces = list(tiny_engine.stream(completion("hello", max_tokens=100), cancelled))
    end = pieces[-1]
    assert isinstance(end, Finished) and end.finish_reason == "cancelled" and end.completion_tokens == 3


# --- the worker process under the pool -----------------------------------------------------------------


@pytest.fixture
async def gemma_worker(gemma_path: Path, tmp_path: Path, llama_runtime: Any) -> Any:
    spec = WorkerSpec(name="gemma", model_path=gemma_path, socket_path=tmp_path / "gemma.sock", context=512,
                      threads=2, chat_format="gemma")
    worker = WorkerProcess(spec, backoff=Backoff(first=0.1))
    worker.start()
    assert await worker.wait_ready(120), worker.error
    yield worker
    await worker.stop()


async def test_sigkill_mid_stream_gives_clean_error_then_next_request_succeeds(gemma_worker: WorkerProcess) -> None:
    up = LocalUpstream(gemma_worker)
    pid = gemma_worker.pid
    assert pid is not None
    got = 0
    with pytest.raises(UpstreamError) as info:
        async for _event in up.generate(completion("Once upon a time", max_tokens=400)):
            got += 1
            if got == 5:
                os.kill(pid, signal.SIGKILL)
    assert info.value.before_first_token is False and "stopped" in info.value.message
    start = time.monotonic()
    events = [e async for e in up.generate(completion("The capital of France is the city of", max_tokens=6))]
    back = time.monotonic() - start
    assert isinstance(events[-1], Finished) and events[-1].completion_tokens == 6
    assert gemma_worker.pid != pid and gemma_worker.restarts == 1
    assert back < 15, f"the worker took {back:.1f}s to come back"
    print(f"worker back and answered in {back:.2f}s")


async def test_closing_stream_frees_the_worker_at_once(gemma_worker: WorkerProcess) -> None:
    up = LocalUpstream(gemma_worker)
    stream = up.generate(completion("Once upon a time", max_tokens=480))
    for _ in range(3):
        assert isinstance(await stream.__anext__(), TokenChunk)
    await stream.aclose()  # type: ignore[attr-defined]
    # Had the worker gone on with the 480-token answer, this would wait ~10 s for its lock.
    start = time.monotonic()
    events = [e async for e in up.generate(completion("Hello", max_tokens=2))]
    assert isinstance(events[-1], Finished)
    assert time.monotonic() - start < 2.0


async def test_worker_reports_offload_and_embeddings_error(gemma_worker: WorkerProcess) -> None:
    off = gemma_worker.info["offload"]
    assert off["layers_total"] > 0 and off["devices"]
    up = LocalUpstream(gemma_worker)
    with pytest.raises(UpstreamError) as info:
        await up.embed("gemma", ["hello"])
    assert info.value.status == 400
    # The worker still serves after the refused request.
    events = [e async for e in up.generate(completion("Hi", max_tokens=2))]
    assert isinstance(events[-1], Finished)
    await asyncio.sleep(0)
