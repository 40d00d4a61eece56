"""Copy a model from a peer over the LAN instead of the internet: encrypted, signed, resumable, sha256-checked.

Every request goes over the household channel (mutual TLS 1.3, the peer's certificate pinned to its node
id). The peer proves the file's size and SHA-256 in a signed answer (/mesh/v1/models/NAME/info); the bytes
come through the model store's own resumable download (HTTP Range, journal, hash on the way, verified
acceptance) from /mesh/v1/models/FILE, every request (and every resume) freshly signed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx

from ..errors import HearthError
from .auth import H_NONCE, H_SIG, derive_key, verify_answer
from .client import PinnedSyncTransport, signed_headers, tls_refusal
from .tls import Credentials

log = logging.getLogger(__name__)


class CopyError(HearthError):
    """A model copy from a peer cannot start (no such model, the peer cannot prove itself)."""


def model_info(credentials: Credentials, peer_url: str, peer_node: str, name: str,
               timeout: float = 60.0) -> dict[str, Any]:
    """{file, size, sha256} of model *name* on the peer, from an answer signed by *peer_node*."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise CopyError(f"'{name}' is not a model name", hint="'hearth peers --json' lists each peer's models")
    key = derive_key(credentials.household.secret)
    url = f"{peer_url.rstrip('/')}/mesh/v1/models/{name}/info"
    headers = signed_headers(key, credentials.node_id, "GET", url)
    transport = PinnedSyncTransport(credentials.context(server=False), peer_node)
    try:
        with httpx.Client(transport=transport, timeout=timeout, trust_env=False) as client:
            resp = client.get(url, headers=headers)
    except httpx.HTTPError as e:
        why = tls_refusal(e)
        raise CopyError(f"the peer at {peer_url} failed the household handshake: {why}" if why
                        else f"cannot reach the peer at {peer_url}: {e}") from None
    if resp.status_code != 200:
        raise CopyError(f"the peer at {peer_url} has no model '{name}' ({resp.status_code})")
    if not verify_answer(key, headers[H_NONCE], peer_node, resp.content, resp.headers.get(H_SIG)):
        raise CopyError(f"the peer at {peer_url} did not prove it belongs to the household")
    info = resp.json()
    return {"file": str(info["file"]), "size": int(info["size"]), "sha256": str(info["sha256"])}


def copy_from_peer(store: Any, credentials: Credentials, peer_url: str, peer_node: str, name: str,
                   progress: Callable[..., None] | None = None, should_stop: Callable[[], bool] | None = None,
                   say: Callable[[str], None] | None = None) -> Any:
    """Fetch model *name* from the peer into *store* (a hearth.models.store.Store); returns the StoredModel.

    An interrupted copy resumes on the next call; a file whose hash differs is never accepted."""
    from ..models.download import HttpSource, download

    info = model_info(credentials, peer_url, peer_node, name)
    key, node = derive_key(credentials.household.secret), credentials.node_id
    url = f"{peer_url.rstrip('/')}/mesh/v1/models/{info['file']}"
    part = store.partial_path(info["file"])
    if say and part.exists() and 0 < part.stat().st_size < info["size"]:
        say(f"resuming at {part.stat().st_size} of {info['size']} bytes")

    def sign(method: str, target: str) -> dict[str, str]:
        return signed_headers(key, node, method, target)

    source = HttpSource(url, headers=sign, transport=PinnedSyncTransport(credentials.context(server=False), peer_node))
    model = download(store, source, info["file"], sha256=info["sha256"], size=info["size"],
                     progress=progress, should_stop=should_stop)
    log.info("copied %s (%d bytes) from %s, sha256 ok", info["file"], info["size"], peer_url)
    return model


def peers_with_model(view: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Peers (from the agent's /mesh/v1/peers view) that have model *name*, least busy first."""
    have = [p for p in view.get("peers", ()) if name in (p.get("files") or []) or name in (p.get("stored") or [])]
    return sorted(have, key=lambda p: p.get("queued", 0))


def pull_from_peers(cfg: Any, name: str, progress: Callable[..., None] | None = None) -> Any:
    """Copy *name* from whichever peer has it, as this node's agent sees the mesh; None when no peer has it.

    For ``hearth models pull``: try the LAN first, the internet only when this returns None."""
    from ..models.store import Store
    from . import household, identity

    hh = household.load(cfg.state.dir)
    if hh is None:
        return None
    try:
        resp = httpx.get(f"http://127.0.0.1:{cfg.api.port}/mesh/v1/peers", timeout=3.0, trust_env=False)
        view = resp.json() if resp.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return None
    credentials = Credentials.issue(identity.load_or_create(cfg.state.dir), hh)
    for peer in peers_with_model(view, name):
        try:
            return copy_from_peer(Store.from_config(cfg), credentials, peer["url"], peer["node"], name,
                                  progress=progress)
        except HearthError as e:
            log.warning("copy of %s from %s failed: %s", name, peer.get("name"), e.message)
    return None
