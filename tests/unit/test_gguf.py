"""The pure-Python GGUF reader against files written by the `gguf` package and the real Gemma 3 270M."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import pytest

from hearth.models import gguf as reader
from hearth.models.errors import NotGGUFError

gguf = pytest.importorskip("gguf")


def write_gguf(path: Path, *, arch: str = "llama", big_endian: bool = False, vocab: int = 3000,
               chat_template: str | None = "{{ messages }}", pooling: int | None = None,
               tensor_elems: int = 256) -> Path:
    """A small GGUF with every metadata value type, a long string array and one tensor."""
    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    w = gguf.GGUFWriter(str(path), arch=arch, endianess=endian)
    w.add_name("Tiny Test")
    w.add_block_count(3)
    w.add_context_length(4096)
    w.add_embedding_length(256)
    w.add_head_count(8)
    w.add_head_count_kv(2)
    w.add_file_type(15)
    w.add_uint64("general.parameter_count", 123456)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    if pooling is not None:
        w.add_pooling_type(gguf.PoolingType(pooling))
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4_000_000_000)
    w.add_int32("test.i32", -2_000_000_000)
    w.add_float32("test.f32", 1.5)
    w.add_uint64("test.u64", 2**63)
    w.add_int64("test.i64", -(2**62))
    w.add_float64("test.f64", 2.25)
    w.add_bool("test.bool", True)
    w.add_string("test.str", "héllo")
    w.add_array("test.ints", [1, 2, 3])
    w.add_array("test.strs", ["a", "bc"])
    w.add_array("test.floats", [0.5] * 2000)  # long numeric array: skipped
    w.add_token_list([f"tok{i}" for i in range(vocab)])  # long string array: skipped
    w.add_tensor("weight", np.arange(tensor_elems, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("big_endian", [False, True])
def test_reads_every_value_type(tmp_path: Path, big_endian: bool) -> None:
    meta = reader.read_metadata(write_gguf(tmp_path / "m.gguf", big_endian=big_endian))
    assert meta["GGUF.version"] == 3
    assert meta["GGUF.tensor_count"] == 1
    assert meta["general.architecture"] == "llama"
    assert (meta["test.u8"], meta["test.i8"], meta["test.u16"], meta["test.i16"]) == (200, -100, 60000, -30000)
    assert (meta["test.u32"], meta["test.i32"]) == (4_000_000_000, -2_000_000_000)
    assert (meta["test.u64"], meta["test.i64"]) == (2**63, -(2**62))
    assert meta["test.f32"] == 1.5 and meta["test.f64"] == 2.25 and meta["test.bool"] is True
    assert meta["test.str"] == "héllo"
    assert meta["test.ints"] == [1, 2, 3] and meta["test.strs"] == ["a", "bc"]
    assert meta["test.floats"] == reader.SkippedArray("float32", 2000)
    assert meta["tokenizer.ggml.tokens"] == reader.SkippedArray("string", 3000)


def test_model_facts_of_generated_file(tmp_path: Path) -> None:
    facts = reader.model_facts(write_gguf(tmp_path / "m.gguf"))
    assert facts.architecture == "llama" and facts.name == "Tiny Test"
    assert (facts.n_layers, facts.context_length, facts.embedding_length) == (3, 4096, 256)
    assert (facts.head_count, facts.head_count_kv, facts.key_length, facts.value_length) == (8, 2, 32, 32)
    assert facts.quantization == "Q4_K_M" and facts.parameter_count == 123456
    assert facts.vocab_size == 3000 and facts.has_chat_template and not facts.is_embedding
    # 3 layers x 1000 tokens x 2 kv heads x (32 + 32) x 2 bytes
    assert facts.kv_cache_bytes(1000) == 3 * 1000 * 2 * 64 * 2


def test_embedding_and_template_flags(tmp_path: Path) -> None:
    facts = reader.model_facts(write_gguf(tmp_path / "e.gguf", chat_template=None, pooling=1))
    assert facts.is_embedding and facts.pooling_type == 1 and not facts.has_chat_template


def test_version_2_header_reads_the_same(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "v2.gguf")
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    path.write_bytes(bytes(data))
    assert reader.check_header(path).version == 2
    assert reader.read_metadata(path)["test.str"] == "héllo"


def test_not_gguf(tmp_path: Path) -> None:
    p = tmp_path / "x.gguf"
    p.write_bytes(b"<html>404 Not Found</html>" * 10)
    with pytest.raises(NotGGUFError, match="not a GGUF model file"):
        reader.check_header(p)
    with pytest.raises(NotGGUFError, match="not a GGUF"):
        reader.read_metadata(p)


def test_unsupported_version(tmp_path: Path) -> None:
    p = tmp_path / "v9.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 9, 0, 0))
    with pytest.raises(NotGGUFError, match="unsupported GGUF version 9"):
        reader.check_header(p)


@pytest.mark.parametrize("keep", [0, 3, 10, 200, 3000, 20000])
def test_truncated_metadata_is_a_clear_error(tmp_path: Path, keep: int) -> None:
    full = write_gguf(tmp_path / "full.gguf").read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(full[:keep])
    with pytest.raises(NotGGUFError) as err:
        reader.read_metadata(p)
    assert "truncated" in str(err.value) or "not a GGUF" in str(err.value)


def test_corrupt_lengths_do_not_allocate(tmp_path: Path) -> None:
    p = tmp_path / "bad.gguf"
    # one kv whose key claims to be 2**60 bytes long
    p.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**60))
    with pytest.raises(NotGGUFError, match="corrupt"):
        reader.read_metadata(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotGGUFError, match="cannot read"):
        reader.check_header(tmp_path / "nope.gguf")


def test_gemma_270m_facts(gemma_path: Path) -> None:
    t = time.perf_counter()
    facts = reader.model_facts(gemma_path)
    elapsed = time.perf_counter() - t
    assert facts.architecture == "gemma3" and facts.quantization == "Q4_K_M"
    assert (facts.n_layers, facts.head_count, facts.head_count_kv) == (18, 4, 1)
    assert (facts.key_length, facts.value_length, facts.embedding_length) == (256, 256, 640)
    assert facts.context_length == 32768 and facts.sliding_window == 512
    assert facts.vocab_size == 262144 and not facts.has_chat_template and not facts.is_embedding
    assert facts.file_size == 253113024 and facts.tensor_count == 236
    assert elapsed < 2.0, f"reading metadata took {elapsed:.2f} s; the tokenizer arrays must be skipped, not read"


def test_gemma_matches_the_catalogue(gemma_path: Path) -> None:
    from hearth.models import catalogue

    entry = catalogue.load().get("gemma3-270m")
    facts = reader.model_facts(gemma_path)
    assert entry is not None and entry.file == gemma_path.name
    assert (entry.n_layers, entry.n_kv_heads, entry.head_dim, entry.embedding_length) == (
        facts.n_layers, facts.head_count_kv, facts.key_length, facts.embedding_length)
    assert entry.size_bytes == facts.file_size and entry.context_length == facts.context_length
    assert entry.kv_cache_bytes(8192) == facts.kv_cache_bytes(8192)
