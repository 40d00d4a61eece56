"""Generation on a loaded llama-cpp-python model: the token loop every Hearth path shares.

The worker process serves requests with it, and the serving benchmark uses the very same loop as its
"direct" baseline. It drives ``Llama.generate()`` token by token with an incremental UTF-8 decoder, so
each token costs the same however long the answer grows (``create_completion(stream=True)``
re-decodes all text so far on every token and turns quadratic).
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import random
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import llamacpp
from .types import Finished, GenerationRequest, UpstreamError

log = logging.getLogger(__name__)

_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")


class BadRequest(UpstreamError):
    """The request cannot be served by this model as asked (the API answers 400)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message, status=400, hint=hint)


@dataclass
class LoadOptions:
    """How to load a model: the settings that config and profile decide."""

    context: int = 0
    """Context length in tokens; 0 means the model's own, capped at DEFAULT_CONTEXT_CAP."""
    threads: int = 0
    """Generation threads; 0 lets llama.cpp choose."""
    gpu_layers: int = -1
    """Layers to offload; -1 means all."""
    chat_format: str = ""
    """A llama-cpp-python chat format name; empty means the GGUF's own template."""
    batch: int = 512
    extra: dict[str, Any] = field(default_factory=dict)


class _LogCapture:
    """Routes llama.cpp's log to stderr (warnings and errors only) and keeps the offload line."""

    def __init__(self, llama_cpp: Any) -> None:
        self.offloaded: tuple[int, int] | None = None

        last = [0]

        def callback(level: int, text: bytes | None, user_data: Any) -> None:
            line = (text or b"").decode(errors="replace")
            found = _OFFLOADED.search(line)
            if found:
                self.offloaded = (int(found.group(1)), int(found.group(2)))
            if level != 5:  # GGML_LOG_LEVEL_CONT continues the previous line at its level
                last[0] = level
            if last[0] in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
                sys.stderr.write(line)

        # Keep a reference: llama.cpp calls it for the life of the process.
        self._cb = llama_cpp.llama_log_callback(callback)
        llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))


_capture: _LogCapture | None = None


def _log_capture(llama_cpp: Any) -> _LogCapture:
    # One per process, never freed: llama.cpp keeps calling the callback (also while freeing models),
    # and a collected ctypes callback would be a jump into freed memory.
    global _capture
    if _capture is None:
        _capture = _LogCapture(llama_cpp)
    return _capture


class Engine:
    """A loaded model and the loop that turns a GenerationRequest into text pieces."""

    def __init__(self, llama: Any, name: str = "", chat_format: str = "", offload: dict[str, Any] | None = None) -> None:
        self.llama = llama
        self.name = name
        self._llama_cpp = llamacpp.load()
        self._vocab = llama._model.vocab
        self._piece_buf = ctypes.create_string_buffer(256)
        self._formatter = self._chat_formatter(chat_format)
        self.offload = offload or {}
        meta = getattr(llama, "metadata", {}) or {}
        arch = meta.get("general.architecture", "")
        self.can_embed = bool(getattr(llama, "context_params", None) and llama.context_params.embeddings)
        self.family = arch
        self.n_ctx = llama.n_ctx()

    # --- loading --------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, options: LoadOptions | None = None, name: str = "") -> Engine:
        """Load a GGUF file; errors become UpstreamError with a one-line message."""
        opts = options or LoadOptions()
        llama_cpp = llamacpp.load()
        capture = _log_capture(llama_cpp)
        capture.offloaded = None
        meta = _metadata(path)
        arch = str(meta.get("general.architecture", ""))
        embedding = f"{arch}.pooling_type" in meta
        trained = meta.get(f"{arch}.context_length")
        # A model's training context (often 32k-128k) would reserve gigabytes of KV cache: cap the default.
        n_ctx = opts.context or (min(int(trained), DEFAULT_CONTEXT_CAP) if isinstance(trained, int) else 0)
        chat_format = opts.chat_format
        if not chat_format and "tokenizer.chat_template" not in meta:
            # Without a template llama-cpp-python falls back to llama-2's format, wrong for most models.
            chat_format = _FORMAT_BY_ARCH.get(arch, "")
        kwargs: dict[str, Any] = dict(
            model_path=str(path), n_ctx=n_ctx, n_gpu_layers=opts.gpu_layers, n_batch=opts.batch,
            embedding=embedding, verbose=False, chat_format=chat_format or None, **opts.extra)
        if opts.threads:
            kwargs["n_threads"] = opts.threads
            kwargs["n_threads_batch"] = opts.threads
        try:
            llama = llama_cpp.Llama(**kwargs)
        except (ValueError, RuntimeError, OSError) as e:
            raise UpstreamError(f"cannot load model {path}: {e}", status=503,
                                hint="check that the file is a complete GGUF model") from None
        n_layer = llama_cpp.llama_model_n_layer(llama.model)
        done, total = capture.offloaded or (0, n_layer + 1)
        devices = llamacpp.devices()
        gpus = [d["name"] for d in devices if d["type"] in ("gpu", "igpu")]
        offload = {
            "backend": ", ".join(gpus) if done and gpus else "cpu",
            "devices": devices,
            "cpu_variant": llamacpp.cpu_variant(),
            "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload()),
            "layers_offloaded": done,
            "layers_total": total,
        }
        return cls(llama, name=name or Path(path).stem, chat_format=llama.chat_format or "", offload=offload)

    def _chat_formatter(self, chat_format: str) -> Any:
        from llama_cpp import llama_chat_format as lcf

        meta = getattr(self.llama, "metadata", {}) or {}
        if chat_format.startswith("chat_template."):
            key = "tokenizer.chat_template" if chat_format == "chat_template.default" else "tokenizer." + chat_format
            template = meta.get(key)
            if template:
                model = self.llama._model
                eos, bos = self.llama.token_eos(), self.llama.token_bos()
                return lcf.Jinja2ChatFormatter(
                    template=template, eos_token=model.token_get_text(eos) if eos != -1 else "",
                    bos_token=model.token_get_text(bos) if bos != -1 else "", stop_token_ids=[eos])
        for candidate in (chat_format.replace("-", "_"), chat_format.replace("-", "")):
            fn = getattr(lcf, f"format_{candidate}", None)
            if callable(fn):
                return fn
        return None

    # --- prompts --------------------------------------------------------------------------------

    def tokens_for(self, request: GenerationRequest) -> tuple[list[int], tuple[str, ...]]:
        """The prompt tokens for a request and the stop strings its chat format adds."""
        stops: tuple[str, ...] = ()
        if request.kind == "chat":
            if self._formatter is None:
                raise BadRequest(f"model '{self.name}' has no chat template",
                                 hint="use /v1/completions, or set model.chat_format in hearth.yaml")
            try:
                formatted = self._formatter(messages=list(request.messages))
            except Exception as e:  # a template may raise on roles it does not know
                raise BadRequest(f"the chat template rejected the messages: {e}") from None
            extra = formatted.stop
            stops = (extra,) if isinstance(extra, str) else tuple(extra or ())
            tokens = self.llama.tokenize(formatted.prompt.encode(), add_bos=not formatted.added_special, special=True)
        else:
            tokens = self.llama.tokenize(request.prompt.encode(), add_bos=True, special=True)
        if not tokens:
            raise BadRequest("the prompt is empty")
        if len(tokens) >= self.n_ctx:
            raise BadRequest(f"the prompt is {len(tokens)} tokens but the context holds {self.n_ctx}",
                             hint="shorten the prompt or the conversation")
        return tokens, tuple(s for s in stops if s)

    # --- generation -----------------------------------------------------------------------------

    def _piece(self, token: int) -> bytes:
        lc = self._llama_cpp
        n = lc.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        return self._piece_buf.raw[:n]

    def stream(self, request: GenerationRequest, cancelled: Callable[[], bool] = lambda: False) -> Iterator[str | Finished]:
        """Yield text pieces (whole characters, never partial stop text), then one Finished."""
        tokens, format_stops = self.tokens_for(request)
        stops = tuple(s for s in request.stop if s) + format_stops
        n_prompt = len(tokens)
        room = self.n_ctx - n_prompt
        limit = room if request.max_tokens is None else min(request.max_tokens, room)
        if limit <= 0:
            yield Finished("length", n_prompt, 0)
            return
        llama = self.llama
        if request.seed is not None:
            # Reusing the cached prompt prefix changes the logits in the last bits (one token evaluated
            # alone instead of in a batch), enough to flip a near-tie even under greedy sampling: a
            # seeded request asks to repeat exactly, so it evaluates its whole prompt afresh.
            llama.reset()
            llama.set_seed(request.seed)
        else:
            llama.set_seed(random.randrange(2**31))
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        is_eog = self._llama_cpp.llama_vocab_is_eog
        vocab = self._vocab
        piece = self._piece
        finish = "length"
        n = 0
        held = ""  # text that might be the start of a stop string
        stopped = False
        gen = llama.generate(tokens, top_k=request.top_k, top_p=request.top_p, min_p=request.min_p,
                             temp=request.temperature, repeat_penalty=request.repeat_penalty, reset=True)
        try:
            for token in gen:
                if is_eog(vocab, token):
                    finish = "stop"
                    break
                n += 1
                text = decoder.decode(piece(token))
                if text:
                    if stops:
                        held += text
                        cut = _find_stop(held, stops)
                        if cut is not None:
                            if cut:
                                yield held[:cut]
                            held = ""
                            finish = "stop"
                            stopped = True
                            break
                        keep = _partial_stop(held, stops)
                        if keep < len(held):
                            yield held[: len(held) - keep]
                            held = held[len(held) - keep:]
                    else:
                        yield text
                if n >= limit:
                    break
                if cancelled():
                    finish = "cancelled"
                    break
        finally:
            gen.close()
        if not stopped:
            rest = held + decoder.decode(b"", final=True)
            if rest:
                yield rest
        yield Finished(finish, n_prompt, n)  # type: ignore[arg-type]

    def embed(self, inputs: list[str]) -> tuple[list[list[float]], int]:
        """One embedding per input and the number of tokens read."""
        if not self.can_embed:
            raise BadRequest(f"model '{self.name}' does not provide embeddings",
                             hint="serve an embedding model (for example a BERT-style GGUF) for /v1/embeddings")
        count = 0
        for text in inputs:
            n = len(self.llama.tokenize(text.encode(), add_bos=True, special=True))
            if n > self.n_ctx:
                raise BadRequest(f"an input is {n} tokens but the context holds {self.n_ctx}")
            count += n
        vectors = self.llama.embed(inputs, normalize=True)
        return [list(map(float, v)) for v in vectors], count

    def info(self) -> dict[str, Any]:
        """Facts about the loaded model for ModelInfo and /health."""
        meta = getattr(self.llama, "metadata", {}) or {}
        ftype = meta.get("general.file_type", "")
        return {
            "name": self.name,
            "context_length": self.n_ctx,
            "size_bytes": int(self.llama._model.size()),
            "can_embed": self.can_embed,
            "family": self.family,
            "quantization": _quantization(ftype),
            "chat_format": self.llama.chat_format or "",
            "offload": self.offload,
        }


def _quantization(ftype: Any) -> str:
    """llama.cpp's general.file_type as the name people use (Q4_K_M), one table for the whole agent."""
    from ..models.gguf import FILE_TYPES

    try:
        return FILE_TYPES.get(int(ftype), str(ftype))
    except (TypeError, ValueError):
        return str(ftype)


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    best = None
    for s in stops:
        i = text.find(s)
        if i != -1 and (best is None or i < best):
            best = i
    return best


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of *text* that begins some stop string (to hold back)."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:k]):
                keep = k
                break
    return keep


def _metadata(path: str | Path) -> dict[str, Any]:
    """The GGUF's metadata (header only), or {} when it cannot be read (llama.cpp then says why)."""
    try:
        from ..models.gguf import read_metadata

        return read_metadata(path)
    except Exception:  # an unreadable header is reported by the load that follows
        return {}


DEFAULT_CONTEXT_CAP = 8192
"""Context used when neither config nor profile sets one and the model was trained for more."""

_FORMAT_BY_ARCH = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "qwen2": "chatml", "qwen3": "chatml"}
"""Chat formats for GGUFs that carry no template of their own (Gemma 3 270M base has none)."""

