"""The calling side of the mesh protocol: signed requests to a peer and checked answers (httpx)."""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from . import PROTOCOL_VERSION
from .auth import H_NONCE, H_SIG, derive_key, sign_request, verify_answer
from .household import HouseholdError
from .identity import Identity, fingerprint_of, node_id_of, verify_signature

log = logging.getLogger(__name__)


class PeerRefused(Exception):
    """The peer answered but refused our proof (another household), or its answer carried no valid proof."""


@dataclass(frozen=True)
class HelloAnswer:
    """What a peer proved about itself in /mesh/v1/hello."""

    node: str
    name: str
    public_key: bytes
    version: int
    api_port: int

    @property
    def fingerprint(self) -> str:
        """Its key fingerprint (compare with the one mDNS announced)."""
        return fingerprint_of(self.public_key)


def _path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def signed_headers(key: bytes, node: str, method: str, url: str, body: bytes = b"") -> dict[str, str]:
    """Headers that sign a request to *url* (the signature covers its path and query)."""
    return sign_request(key, method, _path_of(url), body, node)


def hello_body(node: str, name: str, public_key: bytes, challenge: bytes, api_port: int) -> bytes:
    """The JSON body of a hello request."""
    return json.dumps({"node": node, "name": name, "public_key": public_key.hex(), "challenge": challenge.hex(),
                       "version": PROTOCOL_VERSION, "api_port": api_port}).encode()


def check_hello_answer(key: bytes, nonce: str, challenge: bytes, body: bytes, signature: str | None) -> HelloAnswer:
    """Parse and check a hello answer: household MAC bound to our nonce, and Ed25519 proof of its node id."""
    try:
        data = json.loads(body)
        node = str(data["node"])
        public_key = bytes.fromhex(data["public_key"])
        proof = bytes.fromhex(data["proof"])
    except (ValueError, KeyError, TypeError) as e:
        raise PeerRefused(f"malformed hello answer: {e}") from None
    if not verify_answer(key, nonce, node, body, signature):
        raise PeerRefused("hello answer carries no valid household proof")
    if node_id_of(public_key) != node:
        raise PeerRefused(f"node id {node} does not belong to its public key")
    if not verify_signature(public_key, proof, b"hearth-hello" + challenge + node.encode()):
        raise PeerRefused(f"node {node} did not prove it holds its key")
    return HelloAnswer(node, str(data.get("name", "")), public_key, int(data.get("version", 0)),
                       int(data.get("api_port", 0)))


def peer_url_of(text: str, default_port: int = 8080) -> str:
    """A peer's base URL from what a person typed: '10.0.0.5', 'hearth-7f3a.local:9000' or a full URL."""
    text = text.strip().rstrip("/")
    if "://" not in text:
        if text.count(":") > 1 and not text.startswith("["):
            text = f"[{text}]"  # a bare IPv6 address
        text = "http://" + text
    parts = urlsplit(text)
    try:
        has_port = parts.port is not None
    except ValueError:
        has_port = False
    if not has_port and parts.hostname:
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        text = f"{parts.scheme}://{host}:{default_port}{parts.path}"
    return text


def hello_with_secret(secret: bytes, peer_url: str, timeout: float = 5.0,
                      identity: Identity | None = None) -> HelloAnswer | None:
    """Say hello to *peer_url* with a household *secret*: the answer when the peer proves the same household,
    None when it refuses ours; raises HouseholdError when it cannot be reached."""
    key = derive_key(secret)
    if identity is None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        identity = Identity(Ed25519PrivateKey.generate())  # the wizard checks a code before it has a node key
    url = peer_url_of(peer_url) + "/mesh/v1/hello"
    challenge = secrets.token_bytes(16)
    body = hello_body(identity.node_id, identity.default_name, identity.public_bytes, challenge, 0)
    headers = signed_headers(key, identity.node_id, "POST", url, body)
    try:
        resp = httpx.post(url, content=body, headers=headers | {"Content-Type": "application/json"}, timeout=timeout)
    except httpx.HTTPError as e:
        raise HouseholdError(f"cannot reach the node at {peer_url}: {e}",
                             hint="check its address and that it is on this network") from None
    if resp.status_code in (401, 403):
        return None
    if resp.status_code != 200:
        raise HouseholdError(f"the node at {peer_url} answered {resp.status_code}", hint="is it a Hearth node?")
    try:
        return check_hello_answer(key, headers[H_NONCE], challenge, resp.content, resp.headers.get(H_SIG))
    except PeerRefused:
        return None


class MeshClient:
    """Signed calls to peers for the mesh service: hello, state, and the shared httpx client."""

    def __init__(self, identity: Identity, secret: bytes, name: str, api_port: int) -> None:
        self.identity = identity
        self.key = derive_key(secret)
        self.name = name
        self.api_port = api_port
        # No pooled connection may outlive a dead peer for long; keepalive makes the 1 s polls cheap.
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(2.0), limits=httpx.Limits(max_keepalive_connections=32),
                                      trust_env=False)

    def headers(self, method: str, url: str, body: bytes = b"") -> dict[str, str]:
        """Signed headers for a request from this node."""
        return signed_headers(self.key, self.identity.node_id, method, url, body)

    async def hello(self, base_url: str) -> HelloAnswer:
        """The peer's proven identity; raises PeerRefused or httpx.HTTPError."""
        url = base_url + "/mesh/v1/hello"
        challenge = secrets.token_bytes(16)
        body = hello_body(self.identity.node_id, self.name, self.identity.public_bytes, challenge, self.api_port)
        headers = self.headers("POST", url, body)
        resp = await self.http.post(url, content=body, headers=headers | {"Content-Type": "application/json"})
        if resp.status_code != 200:
            raise PeerRefused(f"hello answered {resp.status_code}")
        return check_hello_answer(self.key, headers[H_NONCE], challenge, resp.content, resp.headers.get(H_SIG))

    async def state(self, base_url: str, node: str, timeout: float = 1.5) -> dict[str, Any]:
        """The peer's published state, checked to come from *node* in answer to this request."""
        url = base_url + "/mesh/v1/state"
        headers = self.headers("GET", url)
        resp = await self.http.get(url, headers=headers, timeout=timeout)
        if resp.status_code != 200:
            raise PeerRefused(f"state answered {resp.status_code}")
        if not verify_answer(self.key, headers[H_NONCE], node, resp.content, resp.headers.get(H_SIG)):
            raise PeerRefused("state answer carries no valid household proof")
        data = json.loads(resp.content)
        data["_received"] = time.monotonic()
        return data

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self.http.aclose()
