"""Read a GGUF file's header and metadata in pure Python, streaming, without llama.cpp.

Only the header and the key/value metadata are read; tensors are never touched, and big arrays (the
tokenizer's 262,144 tokens in Gemma 3) are skipped without being built, so reading a 20 GB model's
metadata costs a few megabytes of reads and well under a second.

The format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic ``GGUF``, a uint32
version (2 or 3; 1 used 32-bit counts), uint64 tensor count, uint64 metadata count, then the metadata:
key (uint64 length + UTF-8), uint32 value type, value. Little-endian, or big-endian on some big-endian
builds (detected from the version field).

:func:`model_facts` is the stable interface other parts use (the hardware profiles estimate the KV cache
from it); its field names are documented on :class:`ModelFacts` and must not change.
"""

from __future__ import annotations

import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .errors import NotGGUFError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (1, 2, 3)
HEADER_BYTES = 24
"""Magic + version + tensor count + metadata count (v2/v3)."""

MAX_KEEP_ARRAY = 1024
"""Arrays longer than this are skipped and stand as a :class:`SkippedArray` (type and length only)."""

_MAX_STRING = 64 * 1024 * 1024  # a chat template is a few KB; anything near this is corruption
_MAX_KV = 1_000_000
_MAX_TENSORS = 10_000_000

# GGUF value types: id -> (name, struct format or None for string/array)
_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"),
    4: ("uint32", "I"), 5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "?"),
    8: ("string", None), 9: ("array", None), 10: ("uint64", "Q"), 11: ("int64", "q"), 12: ("float64", "d"),
}

FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}
"""llama.cpp's ``general.file_type`` (llama_ftype) -> the quantization name people use."""

# Architectures that are embedding models (no generation) even without a pooling_type key.
_EMBEDDING_ARCHS = {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "t5encoder", "modern-bert"}


@dataclass(frozen=True)
class SkippedArray:
    """A metadata array too long to keep (e.g. tokenizer tokens): its element type and length only."""

    type: str
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class Header:
    """The fixed GGUF header."""

    version: int
    tensor_count: int
    kv_count: int
    byte_order: str  # "<" little-endian, ">" big-endian


class _Reader:
    """A forward-only reader over a file with a big buffer: cheap small reads and cheap skips."""

    def __init__(self, f: BinaryIO, path: Path, chunk: int = 1 << 20) -> None:
        self.f, self.path, self.chunk = f, path, chunk
        self.buf = b""
        self.pos = 0  # position inside buf
        self.order = "<"

    def _fill(self, n: int) -> None:
        if len(self.buf) - self.pos >= n:
            return
        rest = self.buf[self.pos:]
        more = self.f.read(max(n - len(rest), self.chunk))
        self.buf, self.pos = rest + more, 0
        if len(self.buf) < n:
            raise NotGGUFError(f"{self.path}: truncated GGUF file (metadata ends early)",
                               hint="the file is incomplete; download or copy it again")

    def read(self, n: int) -> bytes:
        self._fill(n)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._fill(size)
        (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def skip(self, n: int) -> None:
        left = len(self.buf) - self.pos
        if n <= left:
            self.pos += n
            return
        n -= left
        self.buf, self.pos = b"", 0
        here = self.f.tell()
        end = self.f.seek(0, os.SEEK_END)
        if here + n > end:
            raise NotGGUFError(f"{self.path}: truncated GGUF file (metadata ends early)",
                               hint="the file is incomplete; download or copy it again")
        self.f.seek(here + n)

    def skip_strings(self, count: int) -> None:
        """Skip *count* length-prefixed strings (a tokenizer's vocabulary) without decoding them."""
        unpack_from = struct.Struct(self.order + "Q").unpack_from
        for _ in range(count):
            if len(self.buf) - self.pos < 8:
                self._fill(8)
            (n,) = unpack_from(self.buf, self.pos)
            if n > _MAX_STRING:
                raise NotGGUFError(f"{self.path}: corrupt GGUF metadata (string of {n} bytes)")
            end = self.pos + 8 + n
            if end <= len(self.buf):
                self.pos = end
            else:
                self.pos += 8
                self.skip(n)

    def string(self, what: str = "string") -> str:
        n = self.unpack("Q")
        if n > _MAX_STRING:
            raise NotGGUFError(f"{self.path}: corrupt GGUF metadata ({what} of {n} bytes)")
        raw = self.read(n)
        return raw.decode("utf-8", errors="replace")


def _read_header(r: _Reader) -> Header:
    if r.read(4) != MAGIC:
        raise NotGGUFError(f"{r.path}: not a GGUF model file (no GGUF magic)",
                           hint="Hearth serves GGUF files (llama.cpp's format); convert or download a .gguf")
    raw_version = r.read(4)
    version = struct.unpack("<I", raw_version)[0]
    if version not in SUPPORTED_VERSIONS and struct.unpack(">I", raw_version)[0] in SUPPORTED_VERSIONS:
        r.order = ">"
        version = struct.unpack(">I", raw_version)[0]
    if version not in SUPPORTED_VERSIONS:
        raise NotGGUFError(f"{r.path}: unsupported GGUF version {version}",
                           hint="Hearth reads GGUF versions 2 and 3; re-convert the model with a current llama.cpp")
    counts = "I" if version == 1 else "Q"
    tensors, kvs = r.unpack(counts), r.unpack(counts)
    if tensors > _MAX_TENSORS or kvs > _MAX_KV:
        raise NotGGUFError(f"{r.path}: corrupt GGUF header ({tensors} tensors, {kvs} metadata keys)")
    return Header(version, tensors, kvs, r.order)


def _value(r: _Reader, vtype: int, key: str) -> Any:
    kind = _TYPES.get(vtype)
    if kind is None:
        raise NotGGUFError(f"{r.path}: corrupt GGUF metadata (unknown value type {vtype} for {key!r})")
    name, fmt = kind
    if fmt is not None:
        return r.unpack(fmt)
    if name == "string":
        return r.string(f"value of {key!r}")
    etype, count = r.unpack("I"), r.unpack("Q")
    ekind = _TYPES.get(etype)
    if ekind is None:
        raise NotGGUFError(f"{r.path}: corrupt GGUF metadata (unknown array type {etype} for {key!r})")
    ename, efmt = ekind
    if count > MAX_KEEP_ARRAY:
        if efmt is not None:
            r.skip(count * struct.calcsize(efmt))
        elif ename == "string":
            r.skip_strings(count)
        else:  # arrays of arrays: walk them
            for _ in range(count):
                _value(r, etype, key)
        return SkippedArray(ename, count)
    if efmt is not None:
        size = struct.calcsize(efmt)
        data = r.read(size * count)
        return list(struct.unpack(f"{r.order}{count}{efmt}", data))
    return [_value(r, etype, key) for _ in range(count)]


def check_header(path: str | os.PathLike[str]) -> Header:
    """Check that *path* starts like a GGUF file; raise :class:`NotGGUFError` with a clear message if not."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return _read_header(_Reader(f, p, chunk=HEADER_BYTES))
    except OSError as e:
        raise NotGGUFError(f"{p}: cannot read: {e.strerror or e}") from None


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All metadata key/values of a GGUF file (long arrays as :class:`SkippedArray`), plus ``GGUF.*`` header keys."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            r = _Reader(f, p)
            h = _read_header(r)
            meta: dict[str, Any] = {"GGUF.version": h.version, "GGUF.tensor_count": h.tensor_count,
                                    "GGUF.kv_count": h.kv_count}
            for _ in range(h.kv_count):
                key = r.string("key")
                meta[key] = _value(r, r.unpack("I"), key)
            return meta
    except OSError as e:
        raise NotGGUFError(f"{p}: cannot read: {e.strerror or e}") from None


@dataclass(frozen=True)
class ModelFacts:
    """What a GGUF file says about its model: the numbers needed to size memory before loading it.

    Field names are a stable interface (the hardware profiles use them):

    - ``architecture``: ``general.architecture`` (``llama``, ``gemma3``, ``qwen2`` ...).
    - ``n_layers``: ``<arch>.block_count``, transformer blocks (each holds a K and a V cache).
    - ``context_length``: native (trained) context in tokens.
    - ``embedding_length``: hidden size.
    - ``head_count`` / ``head_count_kv``: attention heads and key/value heads (GQA); per-layer arrays are
      reduced to their maximum so estimates stay conservative.
    - ``key_length`` / ``value_length``: per-head K and V sizes (default ``embedding_length // head_count``).
    - ``file_type`` / ``quantization``: llama.cpp's ftype number and its name (``Q4_K_M``).
    - ``parameter_count``: ``general.parameter_count`` when the file says so, else None.
    - ``has_chat_template``: whether ``tokenizer.chat_template`` is present.
    - ``pooling_type`` / ``is_embedding``: embedding capability.
    """

    path: str
    file_size: int
    gguf_version: int
    tensor_count: int
    architecture: str
    name: str | None
    size_label: str | None
    n_layers: int | None
    context_length: int | None
    embedding_length: int | None
    head_count: int | None
    head_count_kv: int | None
    key_length: int | None
    value_length: int | None
    sliding_window: int | None
    vocab_size: int | None
    file_type: int | None
    quantization: str | None
    parameter_count: int | None
    has_chat_template: bool
    pooling_type: int | None
    is_embedding: bool

    def kv_cache_bytes(self, n_ctx: int, bytes_per_element: float = 2.0) -> int | None:
        """Bytes of K+V cache for *n_ctx* tokens (f16 cache by default); None if the file lacks the numbers."""
        if not (self.n_layers and self.head_count_kv and self.key_length and self.value_length):
            return None
        return kv_cache_bytes(self.n_layers, n_ctx, self.head_count_kv, self.key_length, self.value_length,
                              bytes_per_element)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)


def kv_cache_bytes(n_layers: int, n_ctx: int, n_kv_heads: int, key_length: int, value_length: int,
                   bytes_per_element: float = 2.0) -> int:
    """K+V cache size: layers x context x kv heads x (key + value length) x element size.

    Upper bound: sliding-window layers (Gemma 3) can hold less in llama.cpp, never more.
    """
    return int(n_layers * n_ctx * n_kv_heads * (key_length + value_length) * bytes_per_element)


def _int(value: Any) -> int | None:
    if isinstance(value, list):
        ints = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
        return max(ints) if ints else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def facts_from_metadata(meta: dict[str, Any], path: str = "", file_size: int = 0) -> ModelFacts:
    """:class:`ModelFacts` from a metadata dict (as :func:`read_metadata` returns)."""
    arch = str(meta.get("general.architecture") or "")

    def a(key: str) -> int | None:
        return _int(meta.get(f"{arch}.{key}"))

    emb, heads = a("embedding_length"), a("attention.head_count")
    head_dim = emb // heads if emb and heads else None
    ftype = _int(meta.get("general.file_type"))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = a("vocab_size") or (len(tokens) if isinstance(tokens, list | SkippedArray) else None)
    pooling = a("pooling_type")
    return ModelFacts(
        path=path, file_size=file_size,
        gguf_version=int(meta.get("GGUF.version", 0)), tensor_count=int(meta.get("GGUF.tensor_count", 0)),
        architecture=arch, name=meta.get("general.name"), size_label=meta.get("general.size_label"),
        n_layers=a("block_count"), context_length=a("context_length"), embedding_length=emb,
        head_count=heads, head_count_kv=a("attention.head_count_kv") or heads,
        key_length=a("attention.key_length") or head_dim, value_length=a("attention.value_length") or head_dim,
        sliding_window=a("attention.sliding_window"), vocab_size=vocab,
        file_type=ftype, quantization=FILE_TYPES.get(ftype) if ftype is not None else None,
        parameter_count=_int(meta.get("general.parameter_count")),
        has_chat_template=isinstance(meta.get("tokenizer.chat_template"), str),
        pooling_type=pooling,
        is_embedding=(pooling is not None and pooling > 0) or arch in _EMBEDDING_ARCHS,
    )


def model_facts(path: str | os.PathLike[str]) -> ModelFacts:
    """Read *path*'s metadata and return the facts needed to size and describe the model."""
    p = Path(path)
    meta = read_metadata(p)
    return facts_from_metadata(meta, str(p), p.stat().st_size)


def tensor_sizes(path: str | os.PathLike[str]) -> dict[str, int]:
    """Bytes of every tensor's data in a GGUF file, by tensor name (read from the tensor index only).

    Each tensor's size is the distance to the next tensor's data (the last one's, to the end of the file),
    so no table of quantization block sizes is needed; alignment padding counts with the tensor before it.
    The pool splits a model by these figures (hearth.pool.plan)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            r = _Reader(f, p)
            h = _read_header(r)
            alignment = 32
            for _ in range(h.kv_count):
                key = r.string("key")
                value = _value(r, r.unpack("I"), key)
                if key == "general.alignment" and isinstance(value, int) and value > 0:
                    alignment = value
            offsets: list[tuple[int, str]] = []
            for _ in range(h.tensor_count):
                name = r.string("tensor name")
                n_dims = r.unpack("I")
                if n_dims > 8:
                    raise NotGGUFError(f"{p}: corrupt GGUF tensor index ({name!r} has {n_dims} dimensions)")
                for _ in range(n_dims):
                    r.unpack("Q")
                r.unpack("I")  # the tensor's type
                offsets.append((r.unpack("Q"), name))
            here = f.tell() - (len(r.buf) - r.pos)
            data_start = (here + alignment - 1) // alignment * alignment
            end = f.seek(0, os.SEEK_END)
    except OSError as e:
        raise NotGGUFError(f"{p}: cannot read: {e.strerror or e}") from None
    offsets.sort()
    sizes: dict[str, int] = {}
    for i, (offset, name) in enumerate(offsets):
        nxt = offsets[i + 1][0] if i + 1 < len(offsets) else end - data_start
        sizes[name] = max(0, nxt - offset)
    return sizes
