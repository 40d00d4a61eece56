"""Thinking models end to end: a real ``hearth agent`` and llama-server with Qwen3's own chat template, and a
model that really writes a thinking block, called with the official ``openai`` and ``ollama`` clients.

No small thinking GGUF is available offline, so one is generated whose weights make a fixed continuation: a
one-layer llama whose attention and feed-forward are zero, so the next token depends only on the last one
(each token of a chain has its own embedding direction, and the output layer maps it to its successor). After
Qwen3's generation prompt (``<|im_start|>assistant`` and a newline) it writes
``<think>Let me think</think>`` then two newlines and ``Hello``; when thinking is off, Qwen3's template ends
the prompt with an empty ``<think>\\n\\n</think>\\n\\n`` itself, whose last token (two newlines) leads
straight to ``Hello``. So what the API returns is decided by the template, llama.cpp's reasoning parser and
Hearth's wire formats, which is what these tests check.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

QWEN3 = "Qwen-Qwen3-0.6B.jinja"
ASK = [{"role": "user", "content": "Say hello."}]
THOUGHT = "Let me think"
ANSWER = "Hello"


def make_chain_gguf(path: Path, chat_template: str, chain: list[str], *, n_ctx: int = 512) -> Path:
    """A llama GGUF that continues deterministically: each token of *chain* is followed by the next one.

    The vocabulary is SentencePiece-style with byte fallback, Qwen's control tokens (``<|im_start|>``,
    ``<|im_end|>``, which ends a turn), ``<think>``/``</think>`` as user-defined tokens (as in Qwen3's own
    tokenizer) and a two-newline piece. *chain* names tokens by their text; the last one should be
    ``<|im_end|>``."""
    import gguf  # type: ignore[import-untyped]
    import numpy as np

    tt = gguf.TokenType
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types = [tt.UNKNOWN, tt.CONTROL, tt.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [tt.BYTE] * 256
    for special, kind in (("<|im_start|>", tt.CONTROL), ("<|im_end|>", tt.CONTROL), ("<think>", tt.USER_DEFINED),
                          ("</think>", tt.USER_DEFINED)):
        tokens.append(special)
        types.append(kind)
    pieces = ["\n\n", "Let", "\u2581me", "\u2581think", "Hello"]
    pieces += [p for c in string.ascii_letters + string.digits + ".,!?" for p in ("\u2581" + c, c)]
    pieces.append("\u2581")
    for p in dict.fromkeys(pieces):
        tokens.append(p)
        types.append(tt.NORMAL)
    scores = [0.0] * len(tokens)
    for i in range(259, len(tokens)):
        scores[i] = -1.0 - i * 1e-4 if len(tokens[i]) <= 2 else 0.0  # whole words win over their letters
    index = {t: i for i, t in enumerate(tokens)}
    n_vocab, n_embd = len(tokens), 32
    assert len(chain) <= n_embd

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("chain-test")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(n_embd)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // 4)
    w.add_file_type(0)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(index["<|im_end|>"])
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(chat_template)
    embd = np.zeros((n_vocab, n_embd), dtype=np.float32)
    out = np.zeros((n_vocab, n_embd), dtype=np.float32)
    for k, (this, following) in enumerate(zip(chain, chain[1:], strict=False)):
        embd[index[this], k] = 1.0  # the token's own direction...
        out[index[following], k] = 10.0  # ...scores its successor: ~80 logits above every other token
    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", out)
    zero = np.zeros((n_embd, n_embd), dtype=np.float32)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        w.add_tensor(f"blk.0.{name}.weight", zero)
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def thinking_gguf(tmp_path_factory: pytest.TempPathFactory, runtime_source: Any) -> Path:
    """The chain model with Qwen3's template (read from the runtime's cached llama.cpp source)."""
    pytest.importorskip("gguf")
    template = runtime_source("models/templates/" + QWEN3).decode()
    chain = ["<0x0A>", "<think>", "Let", "\u2581me", "\u2581think", "</think>", "\n\n", "Hello", "<|im_end|>"]
    return make_chain_gguf(tmp_path_factory.mktemp("thinking") / "qwen3-chain.gguf", template, chain)


@pytest.fixture
def thinker(agent_factory: Any, thinking_gguf: Path, llama_runtime: Any) -> Any:
    """An agent serving the chain model with Qwen3's template."""
    return agent_factory(thinking_gguf, threads=1)


def test_openai_reasoning_content_on_and_off(thinker: Any) -> None:
    """Thoughts come back as reasoning_content, whole and streamed; reasoning_effort none turns them off."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=thinker.url + "/v1", api_key="unused-on-loopback", max_retries=0, timeout=60)
    for effort in (None, "low", "high"):
        kwargs = {} if effort is None else {"reasoning_effort": effort}
        r = client.chat.completions.create(model=thinker.model, messages=ASK, temperature=0, max_tokens=20, **kwargs)
        message = r.model_dump()["choices"][0]["message"]
        assert message["reasoning_content"].strip() == THOUGHT, (effort, message)
        assert message["content"].strip() == ANSWER and r.choices[0].finish_reason == "stop", message
        thoughts, text = "", ""
        for chunk in client.chat.completions.create(model=thinker.model, messages=ASK, temperature=0, max_tokens=20,
                                                    stream=True, **kwargs):
            if chunk.choices:
                delta = chunk.choices[0].delta.model_dump()
                thoughts += delta.get("reasoning_content") or ""
                text += delta.get("content") or ""
        assert thoughts.strip() == THOUGHT and text.strip() == ANSWER, (effort, thoughts, text)
    for effort in ("none", "minimal"):
        r = client.chat.completions.create(model=thinker.model, messages=ASK, temperature=0, max_tokens=20,
                                           reasoning_effort=effort)
        message = r.model_dump()["choices"][0]["message"]
        assert not message.get("reasoning_content") and message["content"].strip() == ANSWER, (effort, message)
        chunks = list(client.chat.completions.create(model=thinker.model, messages=ASK, temperature=0, max_tokens=20,
                                                     stream=True, reasoning_effort=effort))
        deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
        assert not any(d.get("reasoning_content") for d in deltas), deltas
        assert "".join(d.get("content") or "" for d in deltas).strip() == ANSWER


def test_ollama_thinking_on_and_off(thinker: Any) -> None:
    """Ollama's think: thoughts in message.thinking (whole and streamed); think false leaves them out."""
    ollama = pytest.importorskip("ollama")
    c = ollama.Client(host=thinker.url, timeout=60)
    opts = {"temperature": 0, "num_predict": 20}
    r = c.chat(model=thinker.model + ":latest", messages=ASK, think=True, options=opts)
    assert (r.message.thinking or "").strip() == THOUGHT and r.message.content.strip() == ANSWER, r.message
    thinking, content = "", ""
    for chunk in c.chat(model=thinker.model, messages=ASK, think=True, options=opts, stream=True):
        thinking += chunk.message.thinking or ""
        content += chunk.message.content or ""
    assert thinking.strip() == THOUGHT and content.strip() == ANSWER, (thinking, content)
    r = c.chat(model=thinker.model, messages=ASK, think=False, options=opts)
    assert not r.message.thinking and r.message.content.strip() == ANSWER, r.message
    streamed = list(c.chat(model=thinker.model, messages=ASK, think=False, options=opts, stream=True))
    assert not any(k.message.thinking for k in streamed)
    assert "".join(k.message.content or "" for k in streamed).strip() == ANSWER


def test_thoughts_of_earlier_turns_go_back_through_the_template(thinker: Any) -> None:
    """A conversation carrying the assistant's earlier reasoning_content is accepted and rendered by the
    template (Qwen3 drops old thoughts), and the answer still thinks afresh."""
    history = [*ASK, {"role": "assistant", "content": ANSWER, "reasoning_content": THOUGHT},
               {"role": "user", "content": "Again."}]
    r = httpx.post(thinker.url + "/v1/chat/completions", timeout=60, json={
        "model": thinker.model, "messages": history, "temperature": 0, "max_tokens": 20})
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["reasoning_content"].strip() == THOUGHT and message["content"].strip() == ANSWER, message
    ollama_history = [*ASK, {"role": "assistant", "content": ANSWER, "thinking": THOUGHT},
                      {"role": "user", "content": "Again."}]
    r = httpx.post(thinker.url + "/api/chat", timeout=60, json={
        "model": thinker.model, "messages": ollama_history, "stream": False, "think": True,
        "options": {"temperature": 0, "num_predict": 20}})
    assert r.status_code == 200 and r.json()["message"]["thinking"].strip() == THOUGHT, r.text
