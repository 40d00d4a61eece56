"""Embeddings end to end: a real ``hearth agent`` serving a BERT-style embedding model through llama-server
(``--embeddings``), called with the official ``openai`` and ``ollama`` clients.

No small embedding GGUF is available offline, so one is generated with the ``gguf`` package: llama.cpp's
BERT architecture (mean pooling, two layers, 64 wide, seeded weights) over the real BGE WordPiece vocabulary
that llama.cpp ships as a vocab-only GGUF (vendor/llama.cpp/models in the runtime's source). The vectors mean
nothing, but every step a real embedding model takes is real: tokenizing, the encoder, pooling, normalising.
"""

from __future__ import annotations

import base64
import math
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

N_EMBD = 64
N_CTX = 1024


def make_bert_gguf(path: Path, vocab_gguf: Path, *, n_embd: int = N_EMBD, n_layer: int = 2, n_head: int = 4,
                   n_ff: int = 128, n_ctx: int = N_CTX, seed: int = 0) -> Path:
    """Write a tiny BERT encoder with mean pooling over the tokenizer of *vocab_gguf* (a vocab-only BERT GGUF)."""
    import gguf  # type: ignore[import-untyped]
    import numpy as np

    vocab = gguf.GGUFReader(str(vocab_gguf))
    fields = vocab.fields
    tokens = [str(bytes(fields["tokenizer.ggml.tokens"].parts[i]), "utf-8")
              for i in fields["tokenizer.ggml.tokens"].data]
    types = [int(fields["tokenizer.ggml.token_type"].parts[i][0]) for i in fields["tokenizer.ggml.token_type"].data]

    def scalar(key: str) -> int:
        return int(fields[key].contents())

    w = gguf.GGUFWriter(str(path), "bert")
    w.add_name("tiny-bert-test")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_file_type(0)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre(str(fields["tokenizer.ggml.pre"].contents()))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_type_count(scalar("tokenizer.ggml.token_type_count"))
    for key in ("unknown_token_id", "seperator_token_id", "padding_token_id", "cls_token_id", "mask_token_id"):
        w.add_uint32(f"tokenizer.ggml.{key}", scalar(f"tokenizer.ggml.{key}"))  # as the vocabulary has them
    rng = np.random.default_rng(seed)

    def t(*shape: int) -> Any:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    def ones() -> Any:
        return np.ones(n_embd, dtype=np.float32)

    def zeros(n: int = n_embd) -> Any:
        return np.zeros(n, dtype=np.float32)

    w.add_tensor("token_embd.weight", t(len(tokens), n_embd))
    w.add_tensor("token_types.weight", t(2, n_embd))
    w.add_tensor("position_embd.weight", t(n_ctx, n_embd))
    w.add_tensor("token_embd_norm.weight", ones())
    w.add_tensor("token_embd_norm.bias", zeros())
    for i in range(n_layer):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", t(n_embd, n_embd))
            w.add_tensor(f"blk.{i}.{name}.bias", zeros())
        w.add_tensor(f"blk.{i}.attn_output_norm.weight", ones())
        w.add_tensor(f"blk.{i}.attn_output_norm.bias", zeros())
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.bias", zeros(n_ff))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(n_embd, n_ff))
        w.add_tensor(f"blk.{i}.ffn_down.bias", zeros())
        w.add_tensor(f"blk.{i}.layer_output_norm.weight", ones())
        w.add_tensor(f"blk.{i}.layer_output_norm.bias", zeros())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def bert_gguf(tmp_path_factory: pytest.TempPathFactory, runtime_source: Any) -> Path:
    """The generated embedding model, its vocabulary read from the runtime's cached llama.cpp source."""
    pytest.importorskip("gguf")
    out = tmp_path_factory.mktemp("bert")
    (out / "vocab.gguf").write_bytes(runtime_source("models/ggml-vocab-bert-bge.gguf"))
    return make_bert_gguf(out / "tiny-bert.gguf", out / "vocab.gguf")


@pytest.fixture
def embedder(agent_factory: Any, bert_gguf: Path, llama_runtime: Any) -> Any:
    """An agent serving only the embedding model."""
    return agent_factory(bert_gguf, threads=1)


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def _close(a: list[float], b: list[float], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def test_openai_client_embeddings(embedder: Any) -> None:
    """Shapes, unit length, float and base64 alike, a batch in order and equal to its texts one by one."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=embedder.url + "/v1", api_key="unused-on-loopback", max_retries=0, timeout=60)
    texts = ["the kitchen light is on", "hello world", "the kitchen light is on"]
    whole = client.embeddings.create(model=embedder.model, input=texts)  # the client asks for base64
    assert [d.index for d in whole.data] == [0, 1, 2] and whole.model == embedder.model
    vectors = [d.embedding for d in whole.data]
    assert all(len(v) == N_EMBD for v in vectors)
    assert all(abs(_norm(v) - 1.0) < 1e-3 for v in vectors), [_norm(v) for v in vectors]
    assert _close(vectors[0], vectors[2]) and not _close(vectors[0], vectors[1], 1e-2)
    assert whole.usage.prompt_tokens >= 3 * 3 and whole.usage.total_tokens == whole.usage.prompt_tokens
    single = client.embeddings.create(model=embedder.model, input="hello world", encoding_format="float")
    assert len(single.data) == 1 and _close(single.data[0].embedding, vectors[1])
    raw = httpx.post(embedder.url + "/v1/embeddings", timeout=60, json={
        "model": embedder.model, "input": "hello world", "encoding_format": "base64"}).json()
    decoded = list(struct.unpack(f"<{N_EMBD}f", base64.b64decode(raw["data"][0]["embedding"])))
    assert _close(decoded, vectors[1])
    same = client.embeddings.create(model=embedder.model, input=["hello world"], dimensions=N_EMBD)
    assert _close(same.data[0].embedding, vectors[1])


def test_ollama_client_embed(embedder: Any) -> None:
    """/api/embed: one unit vector per input, in order; the single-string form too; show says 'embedding'."""
    ollama = pytest.importorskip("ollama")
    c = ollama.Client(host=embedder.url, timeout=60)
    r = c.embed(model=embedder.model + ":latest", input=["hello world", "the den"])
    assert len(r.embeddings) == 2 and all(len(v) == N_EMBD for v in r.embeddings)
    assert all(abs(_norm(v) - 1.0) < 1e-3 for v in r.embeddings)
    assert r.prompt_eval_count and r.prompt_eval_count >= 4
    one = c.embed(model=embedder.model, input="hello world")
    assert len(one.embeddings) == 1 and _close(list(one.embeddings[0]), list(r.embeddings[0]))
    show = c.show(embedder.model)
    assert show.capabilities == ["embedding"]


def test_what_cannot_be_honoured_is_a_400_naming_it(embedder: Any) -> None:
    """Dimensions it cannot make, token arrays, truncation, keep_alive 0, generation on an embedding model,
    an input longer than the model's context: each a 400 that names the field, and the node still serves."""
    url = embedder.url
    model = embedder.model

    def post(path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(url + path, json={"model": model, **body}, timeout=60)

    cases = [
        ("/v1/embeddings", {"input": "hi", "dimensions": 8}, "dimensions"),
        ("/v1/embeddings", {"input": [[101, 7592, 102]]}, "input"),  # token ids: another tokenizer's, maybe
        ("/v1/embeddings", {"input": []}, "input"),
        ("/v1/embeddings", {"input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ("/api/embed", {"input": "hi", "dimensions": 8}, "dimensions"),
        ("/api/embed", {"input": "hi", "truncate": True}, "truncate"),
        ("/api/embed", {"input": "hi", "keep_alive": 0}, "keep_alive"),
        ("/api/embed", {"input": "hi", "options": {"num_gpu": 1}}, "num_gpu"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ("/v1/completions", {"prompt": "hi"}, "model"),
        ("/api/chat", {"messages": [{"role": "user", "content": "hi"}], "stream": False}, "model"),
    ]
    for path, body, field in cases:
        r = post(path, body)
        assert r.status_code == 400, (path, body, r.status_code, r.text)
        assert field in r.text, (path, body, r.text)
    too_long = " ".join(["kitchen"] * (N_CTX + 10))
    for path in ("/v1/embeddings", "/api/embed"):
        r = post(path, {"input": ["hi", too_long]})
        assert r.status_code == 400 and "input" in r.text and "context" in r.text, (path, r.status_code, r.text)
    # Longer than llama.cpp's default batch (512) but within the context: one input is read in one batch.
    long = " ".join(["kitchen"] * 700)
    r = post("/v1/embeddings", {"input": long})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] >= 700, r.text
    r = post("/v1/embeddings", {"input": "still here"})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == N_EMBD


def test_a_chat_model_refuses_embeddings(agent_factory: Any, tiny_gguf: Path, llama_runtime: Any) -> None:
    """A model without a pooling head: /v1/embeddings and /api/embed are 400s that name the model."""
    agent = agent_factory(tiny_gguf, threads=1)
    for path in ("/v1/embeddings", "/api/embed"):
        r = httpx.post(agent.url + path, json={"model": agent.model, "input": "hi"}, timeout=30)
        assert r.status_code == 400 and "cannot make embeddings" in r.text, (path, r.text)
