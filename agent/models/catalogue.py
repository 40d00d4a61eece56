"""The model catalogue (``profiles/models.yaml``): known models, their files, hashes, sources and sizes.

Each entry carries the architecture numbers (layers, KV heads, head size) needed to estimate memory
*before* a download, so profile selection can pick a model the node has not fetched yet. Hashes not yet
verified are ``sha256_pending`` and get pinned into ``<state>/models/pins.yaml`` by the first download
whose file passes every other check.

``HEARTH_CATALOGUE=/path/to/models.yaml`` in the environment replaces the shipped catalogue everywhere
(the store, profile selection, the agent): for tests and for a household that keeps its own list. Sources
are https:// URLs or ``pypi:<package>``; plain http:// is accepted only for loopback hosts (127.0.0.0/8,
localhost, [::1]), which is what tests serve from.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import CatalogueError
from .gguf import kv_cache_bytes

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LOOPBACK_HTTP = re.compile(r"^http://(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:\d+)?/")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*\.gguf$")


@dataclass(frozen=True)
class CatalogueEntry:
    """One model of the catalogue (see the header of profiles/models.yaml for each field's meaning)."""

    name: str
    display_name: str
    family: str
    parameters_b: float
    quantization: str
    file: str
    size_bytes: int
    sources: tuple[str, ...]
    licence: str
    context_length: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    embedding_length: int
    sha256: str | None = None
    sha256_pending: bool = False
    size_exact: bool = True
    instruct: bool = True
    chat_format: str | None = None
    notes: str | None = None

    def kv_cache_bytes(self, n_ctx: int, bytes_per_element: float = 2.0) -> int:
        """Bytes of K+V cache for *n_ctx* tokens (f16 by default), from the catalogue's numbers."""
        return kv_cache_bytes(self.n_layers, n_ctx, self.n_kv_heads, self.head_dim, self.head_dim,
                              bytes_per_element)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        d = asdict(self)
        d["sources"] = list(self.sources)
        return d


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "name": str, "display_name": str, "family": str, "parameters_b": (int, float), "quantization": str,
    "file": str, "size_bytes": int, "sources": list, "licence": str, "context_length": int,
    "n_layers": int, "n_kv_heads": int, "head_dim": int, "embedding_length": int,
}
_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "sha256": (str, type(None)), "sha256_pending": bool, "size_exact": bool, "instruct": bool,
    "chat_format": (str, type(None)), "notes": (str, type(None)),
}


def _entry(raw: Any, index: int, where: str) -> CatalogueEntry:
    label = f"{where}: entry {index + 1}"
    if not isinstance(raw, dict):
        raise CatalogueError(f"{label} must be a mapping of fields")
    if isinstance(raw.get("name"), str):
        label = f"{where}: model '{raw['name']}'"
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise CatalogueError(f"{label}: unknown field '{unknown[0]}'", hint="see the field list at the top of models.yaml")
    for key, tp in {**_REQUIRED, **_OPTIONAL}.items():
        if key not in raw:
            if key in _REQUIRED:
                raise CatalogueError(f"{label}: missing field '{key}'")
            continue
        value = raw[key]
        if not isinstance(value, tp) or (isinstance(value, bool) and tp in (int, (int, float))):
            raise CatalogueError(f"{label}: field '{key}' has the wrong type ({type(value).__name__})")
    if not _NAME.match(raw["name"]):
        raise CatalogueError(f"{label}: name must be lowercase letters, digits, '.', '_' or '-'")
    if not _FILE.match(raw["file"]) or "/" in raw["file"]:
        raise CatalogueError(f"{label}: file must be a plain .gguf file name")
    for key in ("size_bytes", "context_length", "n_layers", "n_kv_heads", "head_dim", "embedding_length",
                "parameters_b"):
        if raw[key] <= 0:
            raise CatalogueError(f"{label}: {key} must be positive")
    sha, pending = raw.get("sha256"), raw.get("sha256_pending", False)
    if sha is None and not pending:
        raise CatalogueError(f"{label}: sha256 is missing", hint="give the hash, or set sha256_pending: true")
    if sha is not None and not _SHA256.match(sha):
        raise CatalogueError(f"{label}: sha256 must be 64 lowercase hex digits")
    if sha is not None and pending:
        raise CatalogueError(f"{label}: sha256 is given but sha256_pending is true")
    sources = raw["sources"]
    if not sources or not all(isinstance(s, str) and (s.startswith(("https://", "pypi:")) or _LOOPBACK_HTTP.match(s))
                              for s in sources):
        raise CatalogueError(f"{label}: sources must be a non-empty list of https:// URLs or pypi:<package>")
    data = dict(raw)
    data["sources"] = tuple(sources)
    data["parameters_b"] = float(raw["parameters_b"])
    return CatalogueEntry(**data)


@dataclass(frozen=True)
class Catalogue:
    """All catalogue entries, by name and by file."""

    entries: tuple[CatalogueEntry, ...]
    source: str = ""
    _by_name: dict[str, CatalogueEntry] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name.update({e.name: e for e in self.entries})

    def get(self, name: str) -> CatalogueEntry | None:
        """The entry called *name*, or None."""
        return self._by_name.get(name)

    def by_file(self, file: str) -> CatalogueEntry | None:
        """The entry whose file is *file*, or None."""
        return next((e for e in self.entries if e.file == file), None)

    def names(self) -> list[str]:
        """Every catalogue name, in catalogue order."""
        return [e.name for e in self.entries]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def parse(text: str, source: str = "models.yaml") -> Catalogue:
    """Parse catalogue YAML; a malformed entry raises :class:`CatalogueError` naming it."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise CatalogueError(f"{source}{line}: not valid YAML") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise CatalogueError(f"{source}: must have a 'models:' list")
    entries = [_entry(raw, i, source) for i, raw in enumerate(data["models"])]
    seen_names: set[str] = set()
    seen_files: set[str] = set()
    for item in entries:
        if item.name in seen_names:
            raise CatalogueError(f"{source}: model '{item.name}' appears twice")
        if item.file in seen_files:
            raise CatalogueError(f"{source}: model '{item.name}': file {item.file} is already another entry's file")
        seen_names.add(item.name)
        seen_files.add(item.file)
    return Catalogue(tuple(entries), source)


def load(path: str | os.PathLike[str] | None = None) -> Catalogue:
    """The catalogue at *path*, else the one ``$HEARTH_CATALOGUE`` names, else the one shipped in
    ``hearth.profiles`` (cached)."""
    if path is None and os.environ.get("HEARTH_CATALOGUE"):
        path = os.environ["HEARTH_CATALOGUE"]
    if path is not None:
        p = Path(path)
        try:
            return parse(p.read_text(encoding="utf-8"), str(p))
        except OSError as e:
            raise CatalogueError(f"cannot read the model catalogue {p}: {e.strerror or e}") from None
    return _builtin()


@lru_cache(maxsize=1)
def _builtin() -> Catalogue:
    text = resources.files("hearth.profiles").joinpath("models.yaml").read_text(encoding="utf-8")
    return parse(text, "profiles/models.yaml")
