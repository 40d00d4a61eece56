"""Signed mesh requests: HMAC-SHA256 with a key derived (HKDF) from the household secret.

A request carries ``X-Hearth-Node``, ``X-Hearth-Timestamp``, ``X-Hearth-Nonce`` and
``X-Hearth-Signature``; the MAC covers the method, the path (with query), the body's SHA-256, the
timestamp, the nonce and the sender's node id. The receiver accepts a timestamp within ±30 s and each
nonce once (a replayed request is refused). Answers that carry peer state are signed too, bound to the
request's nonce, so a node that cannot prove it belongs to the household is never routed to.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import HearthError

H_NODE = "X-Hearth-Node"
H_TIME = "X-Hearth-Timestamp"
H_NONCE = "X-Hearth-Nonce"
H_SIG = "X-Hearth-Signature"
WINDOW_S = 30.0
"""How far a request's timestamp may be from this node's clock."""
_MAX_NONCES = 100_000


class AuthError(HearthError):
    """A mesh request or answer failed authentication; ``status`` is 401 (no or stale proof) or 403 (bad proof)."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


def derive_key(secret: bytes, purpose: bytes = b"hearth mesh v1 request signing") -> bytes:
    """The 32-byte signing key for *purpose*, derived from the household secret with HKDF-SHA256."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"hearth-household", info=purpose).derive(secret)


def _canonical(method: str, path: str, body_hash: str, ts: str, nonce: str, node: str) -> bytes:
    return "\n".join(["HEARTH1", method.upper(), path, body_hash, ts, nonce, node]).encode()


def sign_request(key: bytes, method: str, path: str, body: bytes, node: str,
                 ts: float | None = None, nonce: str | None = None) -> dict[str, str]:
    """The X-Hearth-* headers that sign a request (*path* includes any query string)."""
    ts_s = str(int(ts if ts is not None else time.time()))
    nonce = nonce or secrets.token_hex(16)
    mac = hmac.new(key, _canonical(method, path, hashlib.sha256(body).hexdigest(), ts_s, nonce, node),
                   hashlib.sha256).hexdigest()
    return {H_NODE: node, H_TIME: ts_s, H_NONCE: nonce, H_SIG: mac}


def sign_answer(key: bytes, nonce: str, node: str, body: bytes) -> str:
    """The signature of an answer to the request that carried *nonce*."""
    msg = "\n".join(["HEARTH1-ANSWER", nonce, node, hashlib.sha256(body).hexdigest()]).encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def verify_answer(key: bytes, nonce: str, node: str, body: bytes, signature: str | None) -> bool:
    """Whether an answer's signature proves it comes from a household member answering *nonce*."""
    return bool(signature) and hmac.compare_digest(sign_answer(key, nonce, node, body), str(signature))


class NonceCache:
    """Nonces seen within the replay window; a nonce seen twice is a replay. Thread-safe, bounded."""

    def __init__(self, window_s: float = WINDOW_S, max_size: int = _MAX_NONCES) -> None:
        self.window_s = window_s
        self.max_size = max_size
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, nonce: str, now: float | None = None) -> bool:
        """Record *nonce*; False when it was already seen (a replay)."""
        now = time.time() if now is None else now
        with self._lock:
            # Anything older than two windows can no longer pass the timestamp check, so forget it.
            while self._seen:
                oldest, at = next(iter(self._seen.items()))
                if at >= now - 2 * self.window_s and len(self._seen) < self.max_size:
                    break
                del self._seen[oldest]
            if nonce in self._seen:
                return False
            self._seen[nonce] = now
            return True

    def __len__(self) -> int:
        return len(self._seen)


class Verifier:
    """Checks signed requests against the household key, the clock window and the nonce cache."""

    def __init__(self, key: bytes, window_s: float = WINDOW_S) -> None:
        self.key = key
        self.window_s = window_s
        self.nonces = NonceCache(window_s)

    def verify(self, method: str, path: str, body: bytes, headers: Mapping[str, str],
               now: float | None = None) -> str:
        """The sender's node id when the request is properly signed and fresh; raises AuthError otherwise."""
        lower = {k.lower(): v for k, v in headers.items()}
        node, ts, nonce, sig = (lower.get(h.lower()) for h in (H_NODE, H_TIME, H_NONCE, H_SIG))
        if not (node and ts and nonce and sig):
            raise AuthError("unsigned request", status=401)
        if len(nonce) < 16 or len(nonce) > 128 or len(node) > 64:
            raise AuthError("malformed signature headers", status=401)
        try:
            ts_f = float(ts)
        except ValueError:
            raise AuthError("malformed timestamp", status=401) from None
        now = time.time() if now is None else now
        if abs(now - ts_f) > self.window_s:
            raise AuthError(f"timestamp {abs(now - ts_f):.0f} s away from this node's clock", status=401)
        expected = hmac.new(self.key, _canonical(method, path, hashlib.sha256(body).hexdigest(), ts, nonce, node),
                            hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, sig):
            raise AuthError("bad signature (forged, or another household)", status=403)
        if not self.nonces.add(nonce, now):
            raise AuthError("replayed request (nonce already used)", status=403)
        return node
