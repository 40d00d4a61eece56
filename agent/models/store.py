"""The model store: GGUF files under ``<state>/models`` (``config.models_dir``).

Layout::

    <models>/<file>.gguf          accepted models (the only files ever listed)
    <models>/index.json           what the store knows about each file: sha256, source, catalogue name
    <models>/pins.yaml            sha256 pinned on first verified download of a catalogue entry whose hash
                                  the catalogue marks pending (trust on first use)
    <models>/.partial/<file>.part          bytes of a download or import in progress (never listed)
    <models>/.partial/<file>.journal.json  the download journal: source, expected size and hash, validator
    <models>/.partial/<file>.lock          flock: one download or import of a file at a time

A file enters the store only by :meth:`Store.accept`: header checked, sha256 checked, fsynced, renamed
atomically into place. So a crash, a full disk or a bad hash never leaves a half model where it is listed.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from ..fsutil import atomic_write, fsync_dir
from . import gguf
from .catalogue import Catalogue, CatalogueEntry
from .catalogue import load as load_catalogue
from .errors import HashMismatchError, ModelNotInStore, ModelStoreError, NoSpaceError, StoreBusyError

log = logging.getLogger(__name__)

PARTIAL_DIR = ".partial"
SPACE_MARGIN = 32 * 1024 * 1024
"""Bytes kept free beyond a model's size, so the store never fills its file system to the last block."""

COPY_CHUNK = 4 * 1024 * 1024

ProgressFn = Callable[[int, int | None, float], None]
"""progress(bytes_done, bytes_total_or_None, bytes_per_second)."""


def human_bytes(n: float) -> str:
    """1.2 GiB, 340.0 MiB, 12.0 KiB, 5 B."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class StoredModel:
    """A model file in the store."""

    name: str
    """Catalogue name when the file is a catalogue entry's, else the file name without .gguf."""
    file: str
    path: Path
    size: int
    sha256: str | None
    """Verified sha256 when the store recorded one (imports, downloads), else None."""
    source: str | None
    in_catalogue: bool
    origin: str
    """'downloaded', 'imported' or 'unknown' (a file put there by hand)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        d = asdict(self)
        d["path"] = str(self.path)
        return d


class Store:
    """The model store in one directory."""

    def __init__(self, root: str | os.PathLike[str], catalogue: Catalogue | None = None) -> None:
        self.root = Path(root)
        self.catalogue = catalogue if catalogue is not None else load_catalogue()

    @classmethod
    def from_config(cls, cfg: Any, catalogue: Catalogue | None = None) -> Store:
        """The store of a node's config (``cfg.models_dir``)."""
        return cls(cfg.models_dir, catalogue)

    # --- paths -----------------------------------------------------------------------------------------

    @property
    def partial_dir(self) -> Path:
        """Where downloads and imports in progress live (hidden, never listed)."""
        return self.root / PARTIAL_DIR

    def partial_path(self, file: str) -> Path:
        """The partial data file of *file*."""
        return self.partial_dir / f"{file}.part"

    def journal_path(self, file: str) -> Path:
        """The download journal of *file*."""
        return self.partial_dir / f"{file}.journal.json"

    def ensure(self) -> None:
        """Create the store's directories (a clear error if that is impossible)."""
        try:
            self.partial_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ModelStoreError(f"cannot create the model store {self.root}: {e.strerror or e}",
                                  hint="set state.models_dir to a writable directory, or run as root") from None

    # --- index and pins ----------------------------------------------------------------------------------

    def _index(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads((self.root / "index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _record(self, file: str, info: dict[str, Any] | None) -> None:
        index = self._index()
        if info is None:
            index.pop(file, None)
        else:
            index[file] = info
        atomic_write(self.root / "index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")

    def pins(self) -> dict[str, dict[str, Any]]:
        """Pinned hashes of catalogue entries whose hash the catalogue marks pending: name -> {sha256, ...}."""
        try:
            data = yaml.safe_load((self.root / "pins.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}

    def pin(self, entry: CatalogueEntry, sha256: str, size: int, source: str) -> None:
        """Remember the verified hash of a pending catalogue entry (trust on first use)."""
        pins = self.pins()
        pins[entry.name] = {"file": entry.file, "sha256": sha256, "size_bytes": size, "source": source,
                            "pinned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        text = "# sha256 pinned on first verified download (catalogue hash pending). Delete an entry to re-pin.\n"
        atomic_write(self.root / "pins.yaml", text + yaml.safe_dump(pins, sort_keys=True))
        log.info("pinned sha256 of %s: %s", entry.name, sha256)

    def expected_sha256(self, entry: CatalogueEntry) -> str | None:
        """The hash a file of *entry* must have: the catalogue's, else the pinned one, else None."""
        return entry.sha256 or (self.pins().get(entry.name) or {}).get("sha256")

    # --- listing and lookup --------------------------------------------------------------------------------

    def list(self) -> list[StoredModel]:
        """Every accepted model file (``*.gguf`` directly in the store; partials never appear)."""
        if not self.root.is_dir():
            return []
        index = self._index()
        out = []
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(".") or p.suffix != ".gguf" or not p.is_file():
                continue
            info = index.get(p.name, {})
            entry = self.catalogue.by_file(p.name)
            out.append(StoredModel(
                name=entry.name if entry else p.stem, file=p.name, path=p, size=p.stat().st_size,
                sha256=info.get("sha256"), source=info.get("source"), in_catalogue=entry is not None,
                origin=info.get("origin", "unknown"),
            ))
        return out

    def find(self, name: str) -> StoredModel | None:
        """The stored model called *name* (catalogue name, file name or file stem), or None."""
        for m in self.list():
            if name in (m.name, m.file, m.path.stem):
                return m
        return None

    def resolve(self, name: str) -> Path:
        """The path of a model: a catalogue name, a file in the store, or a path to a GGUF file."""
        found = self.find(name)
        if found:
            return found.path
        if os.sep in name or name.endswith(".gguf"):
            p = Path(name).expanduser()
            if p.is_file():
                gguf.check_header(p)
                return p.resolve()
        entry = self.catalogue.get(name)
        if entry:
            raise ModelNotInStore(f"model '{name}' is not in the store yet",
                                  hint=f"hearth models pull {name}")
        raise ModelNotInStore(f"no model '{name}' in the store or the catalogue",
                              hint="hearth models list shows what is stored; the catalogue names are in profiles/models.yaml")

    def remove(self, name: str) -> builtins.list[Path]:
        """Delete a stored model (and any partial download of it); returns what was deleted."""
        found = self.find(name)
        entry = self.catalogue.get(name)
        file = found.file if found else (entry.file if entry else (name if name.endswith(".gguf") else None))
        removed: list[Path] = []
        if file:
            with self.lock(file):
                for p in (self.root / file, self.partial_path(file), self.journal_path(file)):
                    if p.is_file():
                        p.unlink()
                        removed.append(p)
                if found:
                    self._record(file, None)
                fsync_dir(self.root)
        if not removed:
            raise ModelNotInStore(f"no model '{name}' in the store", hint="hearth models list shows what is stored")
        return removed

    # --- space, locks, acceptance ---------------------------------------------------------------------------

    def free_bytes(self) -> int:
        """Free bytes on the store's file system."""
        self.ensure()
        return shutil.disk_usage(self.root).free

    def check_space(self, needed: int) -> None:
        """Raise :class:`NoSpaceError` unless *needed* bytes (plus a margin) are free."""
        free = self.free_bytes()
        if needed + SPACE_MARGIN > free:
            raise NoSpaceError(f"not enough space: needs {human_bytes(needed)}, {human_bytes(free)} free on {self.root}",
                               hint="remove a model (hearth models rm NAME) or give the store a bigger disk")

    def no_space(self, needed: int | None = None) -> NoSpaceError:
        """The error for a write that hit ENOSPC."""
        free = shutil.disk_usage(self.root).free if self.root.exists() else 0
        what = f"needs {human_bytes(needed)}, " if needed else ""
        return NoSpaceError(f"not enough space: {what}{human_bytes(free)} free on {self.root} (the disk filled up)",
                            hint="free some space (hearth models rm NAME) and run the same command again")

    @contextlib.contextmanager
    def lock(self, file: str) -> Iterator[None]:
        """Hold the lock of *file* so that only one process downloads or imports it at a time."""
        self.ensure()
        fd = os.open(self.partial_dir / f"{file}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreBusyError(f"{file} is being downloaded or imported by another process",
                                     hint="wait for it to finish, or stop it") from None
            yield
        finally:
            os.close(fd)

    def accept(self, part: Path, file: str, sha256: str, expected_sha256: str | None, *, source: str,
               origin: str, entry: CatalogueEntry | None = None) -> StoredModel:
        """Check a finished partial file and move it into the store atomically.

        The GGUF header is checked, then the hash; a failing file is deleted (never listed). A catalogue
        entry whose hash is pending gets the verified hash pinned.
        """
        try:
            gguf.check_header(part)
            if expected_sha256 and sha256 != expected_sha256:
                raise HashMismatchError(
                    f"{file}: sha256 mismatch: expected {expected_sha256[:16]}..., got {sha256[:16]}...; the file was deleted",
                    hint="the source sent a different or corrupt file; try again or check the source",
                )
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            raise
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        target = self.root / file
        os.replace(part, target)
        fsync_dir(self.root)
        self._record(file, {"sha256": sha256, "source": source, "origin": origin,
                            "name": entry.name if entry else None,
                            "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if entry and origin == "downloaded" and not entry.sha256 and not expected_sha256:
            self.pin(entry, sha256, target.stat().st_size, source)
        log.info("model %s stored (%s, sha256 %s)", file, human_bytes(target.stat().st_size), sha256)
        found = self.find(file)
        assert found is not None
        return found

    # --- import from a path -----------------------------------------------------------------------------------

    def import_file(self, src: str | os.PathLike[str], *, sha256: str | None = None,
                    progress: ProgressFn | None = None) -> StoredModel:
        """Copy a GGUF file (from a USB stick, say) into the store, verified; returns the stored model.

        The copy goes to a hidden partial file with progress, is hashed on the way, then accepted
        (header, hash if known from *sha256* or the catalogue, atomic rename).
        """
        src_path = Path(src).expanduser()
        if not src_path.is_file():
            raise ModelStoreError(f"{src_path}: no such file", hint="give the path of a .gguf file")
        gguf.check_header(src_path)
        file = src_path.name if src_path.suffix == ".gguf" else src_path.name + ".gguf"
        entry = self.catalogue.by_file(file)
        expected = sha256 or (self.expected_sha256(entry) if entry else None)
        size = src_path.stat().st_size
        if (self.root / file).exists():
            raise ModelStoreError(f"{file} is already in the store", hint=f"hearth models rm {file} first to replace it")
        with self.lock(file):
            self.check_space(size)
            part = self.partial_path(file)
            h = hashlib.sha256()
            done, start = 0, time.monotonic()
            try:
                with open(src_path, "rb") as fin, open(part, "wb") as fout:
                    while chunk := fin.read(COPY_CHUNK):
                        fout.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, size, done / max(time.monotonic() - start, 1e-6))
            except OSError as e:
                with contextlib.suppress(FileNotFoundError):
                    part.unlink()
                if e.errno == errno.ENOSPC:
                    raise self.no_space(size) from None
                raise ModelStoreError(f"copying {src_path} failed: {e.strerror or e}") from None
            return self.accept(part, file, h.hexdigest(), expected, source=str(src_path), origin="imported", entry=entry)


def hash_file(path: Path, limit: int | None = None, h: Any = None) -> Any:
    """sha256 over the first *limit* bytes of *path* (all of it by default); returns the hash object."""
    h = h or hashlib.sha256()
    left = limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            chunk = f.read(COPY_CHUNK if left is None else min(COPY_CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h
