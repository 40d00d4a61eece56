"""Fetch a release's files from a URL or a household peer into the node's update store, checked on arrival.

The store is ``<state>/updates``: ``incoming/`` while a download runs (files resume with HTTP Range after
a power cut), ``verified/`` once SHA256SUMS' signature and every file's SHA-256 are good. Only then does
anything else see them: systemd-sysupdate installs from ``verified/``, and the agent serves ``verified/``
read-only to its peers, so a household downloads each release once. A peer is trusted for nothing: its
files pass the same signature and hash checks as the publisher's.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ..fsutil import atomic_write
from .boot import version_key
from .sums import SIGNATURE, SUMS, Release, UpdateError, check_file, load_verified, releases

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""progress(file name, bytes so far, total bytes or 0)."""
Headers = Callable[[str, str], dict[str, str]]
"""headers(method, url) for a request (peers sign each request with the household key)."""


@dataclass
class Source:
    """Where release files come from: a base URL (http, https, file) and how to sign requests to it."""

    base: str
    label: str
    headers: Headers | None = field(default=None, repr=False)

    def url(self, name: str) -> str:
        """The URL of file *name* at this source."""
        return f"{self.base.rstrip('/')}/{name}"


def store_dir(state_dir: Path) -> Path:
    """The node's update store."""
    return state_dir / "updates"


def _get(source: Source, name: str, dest: Path, progress: Progress | None, resume: bool) -> None:
    url = source.url(name)
    if url.startswith("file://") or url.startswith("/"):
        path = Path(url.removeprefix("file://"))
        if not path.is_file():
            raise UpdateError(f"{source.label} has no {name}")
        shutil.copyfile(path, dest)
        if progress:
            progress(name, dest.stat().st_size, dest.stat().st_size)
        return
    have = dest.stat().st_size if resume and dest.exists() else 0
    headers = dict(source.headers("GET", url)) if source.headers else {}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(60.0, read=300.0),
                          trust_env=False, follow_redirects=True) as resp:
            if resp.status_code == 404:
                raise UpdateError(f"{source.label} has no {name}")
            if resp.status_code not in (200, 206):
                raise UpdateError(f"{source.label} answered {resp.status_code} for {name}")
            if resp.status_code == 200:
                have = 0  # the server ignored Range: start over
            total = int(resp.headers.get("content-length", 0)) + have
            with dest.open("ab" if have else "wb") as f:
                for chunk in resp.iter_bytes(1 << 20):
                    f.write(chunk)
                    have += len(chunk)
                    if progress:
                        progress(name, have, total)
                f.flush()
                os.fsync(f.fileno())
    except httpx.HTTPError as e:
        raise UpdateError(f"cannot fetch {name} from {source.label}: {e}") from None


def newest(source: Source, work: Path, current: str | None, keyring: Path | None = None) -> Release | None:
    """The newest complete release at *source* newer than *current*, after checking SHA256SUMS' signature.

    Leaves the verified SHA256SUMS and its signature in *work*."""
    work.mkdir(parents=True, exist_ok=True)
    for name in (SUMS, SIGNATURE):
        _get(source, name, work / name, None, resume=False)
    found = releases(load_verified(work, keyring))
    if not found:
        raise UpdateError(f"{source.label}: the signed {SUMS} lists no complete release (UKI, usr, usr-verity)")
    best = max(found.values(), key=lambda r: version_key(r.version))
    if current is not None and version_key(best.version) <= version_key(current):
        return None
    return best


def download(sources: list[Source], state_dir: Path, current: str | None, progress: Progress | None = None,
             keyring: Path | None = None) -> Release | None:
    """Download the newest release any of *sources* offers into ``verified/``; None when already up to date.

    Sources are asked in order (household peers before the publisher's URL); a file that fails on one
    source is fetched from the next. Every file is checked against the signed SHA256SUMS."""
    store = store_dir(state_dir)
    incoming = store / "incoming"
    verified = store / "verified"
    errors: list[str] = []
    offers: list[tuple[Release, Source]] = []
    for source in sources:
        try:
            rel = newest(source, store / "probe", current, keyring)
        except UpdateError as e:
            errors.append(e.message)
            log.warning("update source %s: %s", source.label, e.message)
            continue
        if rel is not None:
            offers.append((rel, source))
    shutil.rmtree(store / "probe", ignore_errors=True)
    if not offers:
        if errors and len(errors) == len(sources):
            raise UpdateError(errors[0] if len(errors) == 1 else "no update source answered: " + "; ".join(errors))
        return None
    release = max((r for r, _ in offers), key=lambda r: version_key(r.version))
    ordered = [s for r, s in offers if r.version == release.version]
    if _complete(verified, release, keyring):
        return release
    incoming.mkdir(parents=True, exist_ok=True)
    # A different release half-downloaded before: start over rather than mix versions.
    for stale in incoming.iterdir():
        if stale.name not in release.files and stale.name not in (SUMS, SIGNATURE):
            stale.unlink()
    for name in (SUMS, SIGNATURE):
        _get(ordered[0], name, incoming / name, None, resume=False)
    sums = load_verified(incoming, keyring)
    for name, digest in sorted(release.files.items(), key=lambda kv: kv[0].endswith(".efi")):
        if sums.get(name) != digest:
            raise UpdateError(f"{ordered[0].label} changed {SUMS} while it was read; try again")
        _fetch_checked(ordered, name, incoming / name, digest, progress)
    _promote(incoming, verified)
    log.info("update %s downloaded and verified", release.version)
    return release


def _fetch_checked(sources: list[Source], name: str, dest: Path, digest: str, progress: Progress | None) -> None:
    last: UpdateError | None = None
    for source in sources:
        for resume in (True, False):
            try:
                _get(source, name, dest, progress, resume=resume)
                check_file(dest, digest)
                return
            except UpdateError as e:
                last = e
                dest.unlink(missing_ok=True)
                if "SHA-256" not in e.message:
                    break
    assert last is not None
    raise last


def _complete(directory: Path, release: Release, keyring: Path | None) -> bool:
    """Whether *directory* already holds *release*, signature and hashes checked."""
    try:
        sums = load_verified(directory, keyring)
        for name, digest in release.files.items():
            if sums.get(name) != digest:
                return False
            check_file(directory / name, digest)
    except (UpdateError, OSError):
        return False
    return True


def _promote(incoming: Path, verified: Path) -> None:
    """Make *incoming* the verified store: swap directories so peers never see a half-written release."""
    old = verified.with_name("verified.old")
    shutil.rmtree(old, ignore_errors=True)
    if verified.exists():
        verified.rename(old)
    incoming.rename(verified)
    shutil.rmtree(old, ignore_errors=True)


def stored(state_dir: Path, keyring: Path | None = None) -> Release | None:
    """The release in the verified store (signature and hashes rechecked), or None."""
    verified = store_dir(state_dir) / "verified"
    try:
        found = releases(load_verified(verified, keyring))
    except (UpdateError, OSError):
        return None
    for rel in sorted(found.values(), key=lambda r: version_key(r.version), reverse=True):
        if _complete(verified, rel, keyring):
            return rel
    return None


def write_note(state_dir: Path, text: str) -> None:
    """Record the last update outcome for 'hearth update status' (atomically)."""
    path = store_dir(state_dir) / "last"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode())
