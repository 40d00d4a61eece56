"""The model store: import from a path, list, resolve, remove, hash and space errors, nothing half-done listed."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import uuid
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from hearth.models import store as store_mod
from hearth.models.catalogue import load as load_catalogue
from hearth.models.errors import (
    HashMismatchError,
    ModelNotInStore,
    ModelStoreError,
    NoSpaceError,
    NotGGUFError,
)
from hearth.models.store import Store

gguf = pytest.importorskip("gguf")


def make_gguf(path: Path, mib: float = 0.1, seed: int = 0) -> Path:
    """A valid GGUF of about *mib* MiB (random float32 weights, so every file's hash differs by seed)."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(1)
    w.add_context_length(256)
    rng = np.random.default_rng(seed)
    w.add_tensor("weight", rng.standard_normal(max(int(mib * 262144), 1)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "models")


def visible(store: Store) -> list[str]:
    """Every non-hidden entry of the store directory (what a person would see as models)."""
    return sorted(p.name for p in store.root.iterdir() if not p.name.startswith(".") and p.suffix == ".gguf")


def no_partials(store: Store) -> bool:
    return not any(p.suffix in (".part", ".json") for p in store.partial_dir.glob("*"))


def test_import_lists_resolves_and_removes(store: Store, tmp_path: Path) -> None:
    (tmp_path / "usb").mkdir()
    src = make_gguf(tmp_path / "usb" / "tiny.gguf")
    seen: list[tuple[int, int | None]] = []
    m = store.import_file(src, progress=lambda done, total, rate: seen.append((done, total)))
    assert m.file == "tiny.gguf" and m.sha256 == sha(src) and m.origin == "imported" and not m.in_catalogue
    assert seen[-1] == (src.stat().st_size, src.stat().st_size)
    assert [x.file for x in store.list()] == ["tiny.gguf"]
    assert store.resolve("tiny") == store.resolve("tiny.gguf") == store.root / "tiny.gguf"
    assert store.resolve(str(src)) == src.resolve()  # a path to a GGUF outside the store works too
    assert no_partials(store)
    with pytest.raises(ModelStoreError, match="already in the store"):
        store.import_file(src)
    removed = store.remove("tiny")
    assert removed == [store.root / "tiny.gguf"] and store.list() == []
    with pytest.raises(ModelNotInStore, match="no model 'tiny' in the store"):
        store.remove("tiny")


def test_import_with_wrong_hash_leaves_nothing(store: Store, tmp_path: Path) -> None:
    src = make_gguf(tmp_path / "m.gguf")
    with pytest.raises(HashMismatchError, match="sha256 mismatch"):
        store.import_file(src, sha256="0" * 64)
    assert store.list() == [] and visible(store) == [] and no_partials(store)


def test_import_of_a_non_gguf_is_refused(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "photo.gguf"
    src.write_bytes(b"\x89PNG" + os.urandom(1000))
    with pytest.raises(NotGGUFError, match="not a GGUF model file"):
        store.import_file(src)
    assert store.list() == []
    with pytest.raises(ModelStoreError, match="no such file"):
        store.import_file(tmp_path / "missing.gguf")


def test_import_checks_the_catalogue_hash_and_does_not_pin(store: Store, tmp_path: Path) -> None:
    # a file named like a catalogue entry with a known hash must have that hash
    src = make_gguf(tmp_path / "gemma-3-270m-q4_k_m.gguf")
    with pytest.raises(HashMismatchError):
        store.import_file(src)
    # a file named like an entry whose hash is pending is accepted but never pinned by an import
    pending = next(e for e in store.catalogue if e.sha256_pending)
    src2 = make_gguf(tmp_path / pending.file)
    m = store.import_file(src2)
    assert m.name == pending.name and m.in_catalogue and store.pins() == {}


def test_listing_ignores_partials_hidden_and_other_files(store: Store, tmp_path: Path) -> None:
    store.ensure()
    (store.partial_dir / "big.gguf.part").write_bytes(b"GGUF")
    (store.root / ".hidden.gguf").write_bytes(b"GGUF")
    (store.root / "notes.txt").write_text("hi")
    make_gguf(store.root / "by-hand.gguf")
    [m] = store.list()
    assert (m.file, m.origin, m.sha256) == ("by-hand.gguf", "unknown", None)


def test_resolve_errors_say_what_to_do(store: Store) -> None:
    with pytest.raises(ModelNotInStore) as err:
        store.resolve("gemma3-4b")
    assert err.value.hint == "hearth models pull gemma3-4b"
    with pytest.raises(ModelNotInStore, match="no model 'nonsense'"):
        store.resolve("nonsense")


Usage = namedtuple("Usage", "total used free")


def test_space_is_checked_before_copying(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_gguf(tmp_path / "m.gguf", mib=1)
    monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda p: Usage(10 << 30, 10 << 30, 1200 << 20))
    store.check_space(1 << 20)  # 1 MiB fits in 1.2 GiB
    with pytest.raises(NoSpaceError) as err:
        store.check_space(int(4.1 * (1 << 30)))
    assert str(err.value) == f"not enough space: needs 4.1 GiB, 1.2 GiB free on {store.root}"
    monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda p: Usage(1 << 30, 1 << 30, 100 << 10))
    with pytest.raises(NoSpaceError, match="not enough space: needs 1.0 MiB, 100.0 KiB free"):
        store.import_file(src)
    assert visible(store) == [] and no_partials(store)


def test_disk_full_during_copy_leaves_nothing(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_gguf(tmp_path / "m.gguf", mib=1)
    real_open = open

    class FullFile:
        def __init__(self, f):  # type: ignore[no-untyped-def]
            self.f, self.n = f, 0

        def write(self, b: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *a):  # type: ignore[no-untyped-def]
            self.f.close()

    def fake_open(path, mode="r", *a, **kw):  # type: ignore[no-untyped-def]
        f = real_open(path, mode, *a, **kw)
        return FullFile(f) if "w" in mode and str(path).endswith(".part") else f

    monkeypatch.setattr("builtins.open", fake_open)
    with pytest.raises(NoSpaceError, match="not enough space"):
        store.import_file(src)
    monkeypatch.undo()
    assert visible(store) == [] and no_partials(store)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real 1 MiB tmpfs (needs root and mount); skipped where that is impossible."""
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_disk_full_on_a_tiny_tmpfs(tiny_tmpfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_gguf(tmp_path / "m.gguf", mib=2)
    store = Store(tiny_tmpfs / "models")
    with pytest.raises(NoSpaceError, match=r"needs 2\.0 MiB, .* free on"):
        store.import_file(src)  # the pre-check refuses
    monkeypatch.setattr(Store, "check_space", lambda self, needed: None)  # let the copy hit the real ENOSPC
    with pytest.raises(NoSpaceError, match="the disk filled up"):
        store.import_file(src)
    assert visible(store) == [] and no_partials(store)
    assert shutil.disk_usage(tiny_tmpfs).used < 512 << 10, "the failed copy must not keep eating the disk"


def test_shipped_catalogue_is_the_default(store: Store) -> None:
    assert store.catalogue.names() == load_catalogue().names()


def test_one_writer_per_file(store: Store, tmp_path: Path) -> None:
    from hearth.models.errors import StoreBusyError

    src = make_gguf(tmp_path / "m.gguf")
    with store.lock("m.gguf"):  # another process downloading or importing the same file
        with pytest.raises(StoreBusyError, match="being downloaded or imported by another process"):
            store.import_file(src)
        with pytest.raises(StoreBusyError):
            store.remove("m.gguf")
    assert store.import_file(src).file == "m.gguf"
