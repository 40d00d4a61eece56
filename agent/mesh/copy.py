"""Copy a model file from a peer over the LAN: signed, resumable (HTTP Range), sha256-checked.

The size and SHA-256 come in a signed answer from the peer (/mesh/v1/models/NAME/info); the bytes come
from /mesh/v1/models/NAME into ``.NAME.part`` beside the target, which a later call resumes. Only a file
whose hash matches is renamed into the store.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import httpx

from ..errors import HearthError
from ..fsutil import fsync_dir
from .auth import H_NONCE, H_SIG, verify_answer
from .client import signed_headers

log = logging.getLogger(__name__)


class CopyError(HearthError):
    """A model copy from a peer failed; the partial file is kept for the next try."""


def _check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise CopyError(f"'{name}' is not a model file name", hint="'hearth peers' lists the files peers have")


def copy_from_peer(key: bytes, node: str, peer_url: str, peer_node: str, name: str, dest_dir: str | os.PathLike[str],
                   retries: int = 3, progress: Callable[[int, int], None] | None = None,
                   timeout: float = 30.0) -> Path:
    """Fetch model *name* from the peer at *peer_url* into *dest_dir*; resumes a partial copy."""
    _check_name(name)
    dest = Path(dest_dir) / name
    part = Path(dest_dir) / f".{name}.part"
    dest.parent.mkdir(parents=True, exist_ok=True)
    base = peer_url.rstrip("/")
    with httpx.Client(timeout=timeout, trust_env=False) as http:
        url = f"{base}/mesh/v1/models/{name}/info"
        headers = signed_headers(key, node, "GET", url)
        resp = http.get(url, headers=headers)
        if resp.status_code != 200:
            raise CopyError(f"peer {peer_url} has no model '{name}' ({resp.status_code})")
        if not verify_answer(key, headers[H_NONCE], peer_node, resp.content, resp.headers.get(H_SIG)):
            raise CopyError(f"peer {peer_url} did not prove it belongs to the household")
        info = resp.json()
        size, sha256 = int(info["size"]), str(info["sha256"])
        attempt = 0
        while True:
            have = part.stat().st_size if part.exists() else 0
            if have > size:
                part.unlink()
                have = 0
            if have == size:
                break
            if have:
                log.info("copy %s: resuming at %d of %d bytes", name, have, size)
            try:
                _fetch(http, key, node, f"{base}/mesh/v1/models/{name}", part, have, size, progress)
            except (httpx.HTTPError, CopyError) as e:
                attempt += 1
                if attempt > retries:
                    raise CopyError(f"copying '{name}' from {peer_url} failed: {e}",
                                    hint="run the copy again: it resumes where it stopped") from None
                log.warning("copy %s: %s; resuming", name, e)
    digest = _sha256(part)
    if digest != sha256:
        part.unlink()
        raise CopyError(f"the copy of '{name}' is damaged (sha256 {digest[:12]}…, expected {sha256[:12]}…)",
                        hint="run the copy again")
    os.replace(part, dest)
    fsync_dir(dest.parent)
    log.info("copied %s (%d bytes) from %s, sha256 ok", name, size, peer_url)
    return dest


def _fetch(http: httpx.Client, key: bytes, node: str, url: str, part: Path, have: int, size: int,
           progress: Callable[[int, int], None] | None) -> None:
    headers = signed_headers(key, node, "GET", url) | {"Range": f"bytes={have}-"}
    with http.stream("GET", url, headers=headers) as resp:
        if resp.status_code == 200 and have:
            have = 0  # the peer ignored the range: start over
            part.unlink(missing_ok=True)
        elif resp.status_code not in (200, 206):
            raise CopyError(f"the peer answered {resp.status_code}")
        with part.open("ab") as f:
            for chunk in resp.iter_bytes(1 << 20):
                f.write(chunk)
                have += len(chunk)
                if progress:
                    progress(have, size)
            f.flush()
            os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
