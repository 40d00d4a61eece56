"""The calling side of the mesh protocol: signed requests to a peer over the household channel (httpx).

Every request goes over mutual TLS 1.3 to the peer's mesh.port (see tls.py and channel.py); the transport
checks on each answer that the certificate belongs to the node the request was meant for, and the
household signature on the request and on state answers stays as a second, independent proof.
"""

from __future__ import annotations

import json
import logging
import secrets
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from . import DEFAULT_PORT, PROTOCOL_VERSION
from .auth import H_NONCE, H_SIG, derive_key, sign_request, verify_answer
from .household import Household, HouseholdError
from .identity import Identity, fingerprint_of, node_id_of, verify_signature
from .tls import Credentials, peer_node_id

PIN = "hearth_node"
"""Request extension naming the node whose certificate the answer must come with."""

log = logging.getLogger(__name__)


class PeerRefused(Exception):
    """The peer answered but refused our proof (another household), or its answer carried no valid proof."""


class WrongPeer(httpx.ConnectError):
    """The TLS certificate on the connection is not the node the request was meant for (an httpx error, so
    callers treat it like a peer that cannot be reached)."""


def tls_refusal(error: BaseException) -> str:
    """Why the household handshake failed, when *error* (an httpx error) comes from our check of the peer's
    certificate (another household's CA, or no TLS at all on that port); '' otherwise."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return str(seen.reason or seen)
        seen = seen.__cause__ or seen.__context__
    return ""


def _check_pin(request: httpx.Request, response: httpx.Response, node: str) -> None:
    want = request.extensions.get(PIN) or node
    if not want:
        return
    stream = response.extensions.get("network_stream")
    got = peer_node_id(stream.get_extra_info("ssl_object") if stream is not None else None)
    if got != want:
        raise WrongPeer(f"the node at {request.url.host}:{request.url.port} is {got or 'not a household node'}, "
                        f"not {want}", request=request)


class PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over the household channel, checking each answer's certificate against the node
    named in the request's 'hearth_node' extension (or *node*)."""

    def __init__(self, context: ssl.SSLContext, node: str = "", **kw: Any) -> None:
        super().__init__(verify=context, trust_env=False, **kw)
        self.node = node

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send *request*; WrongPeer when the certificate is not the expected node's."""
        response = await super().handle_async_request(request)
        try:
            _check_pin(request, response, self.node)
        except WrongPeer:
            await response.aclose()
            raise
        return response


class PinnedSyncTransport(httpx.HTTPTransport):
    """The blocking twin of PinnedTransport (model copies)."""

    def __init__(self, context: ssl.SSLContext, node: str = "", **kw: Any) -> None:
        super().__init__(verify=context, trust_env=False, **kw)
        self.node = node

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send *request*; WrongPeer when the certificate is not the expected node's."""
        response = super().handle_request(request)
        try:
            _check_pin(request, response, self.node)
        except WrongPeer:
            response.close()
            raise
        return response


@dataclass(frozen=True)
class HelloAnswer:
    """What a peer proved about itself in /mesh/v1/hello."""

    node: str
    name: str
    public_key: bytes
    version: int
    api_port: int
    mesh_port: int

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


def hello_body(node: str, name: str, public_key: bytes, challenge: bytes, api_port: int, mesh_port: int) -> bytes:
    """The JSON body of a hello request."""
    return json.dumps({"node": node, "name": name, "public_key": public_key.hex(), "challenge": challenge.hex(),
                       "version": PROTOCOL_VERSION, "api_port": api_port, "mesh_port": mesh_port}).encode()


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
                       int(data.get("api_port", 0)), int(data.get("mesh_port", 0)))


def peer_url_of(text: str, default_port: int = DEFAULT_PORT) -> str:
    """A peer's channel URL from what a person typed: '10.0.0.5', 'hearth-7f3a.local:9000' or a URL.

    The port is the peer's mesh port (mesh.port), never its API port; any scheme becomes https."""
    text = text.strip().rstrip("/")
    if "://" in text:
        text = text.split("://", 1)[1]
    if text.count(":") > 1 and not text.startswith("["):
        text = f"[{text}]"  # a bare IPv6 address
    text = "https://" + text
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
    # The code's household CA issues a certificate for this one check: a peer of that household takes it.
    context = Credentials.issue(identity, Household(secret)).context(server=False)
    url = peer_url_of(peer_url) + "/mesh/v1/hello"
    challenge = secrets.token_bytes(16)
    body = hello_body(identity.node_id, identity.default_name, identity.public_bytes, challenge, 0, 0)
    headers = signed_headers(key, identity.node_id, "POST", url, body)
    try:
        resp = httpx.post(url, content=body, headers=headers | {"Content-Type": "application/json"}, timeout=timeout,
                          verify=context, trust_env=False)
    except httpx.HTTPError as e:
        # Our check of its certificate failed, or it closed the connection after the handshake: its check
        # of ours failed (TLS 1.3 tells the client that only after the handshake).
        why = tls_refusal(e) or (isinstance(e, httpx.RemoteProtocolError | httpx.ReadError) and str(e))
        if why:
            log.info("the node at %s refused the household handshake: %s", peer_url, why)
            return None
        raise HouseholdError(f"cannot reach the node at {peer_url}: {e}",
                             hint="check its address and its mesh port, and that it is on this network") from None
    if resp.status_code in (401, 403):
        return None
    if resp.status_code != 200:
        raise HouseholdError(f"the node at {peer_url} answered {resp.status_code}", hint="is it a Hearth node?")
    try:
        return check_hello_answer(key, headers[H_NONCE], challenge, resp.content, resp.headers.get(H_SIG))
    except PeerRefused:
        return None


def household_states(secret: bytes, peer_urls: list[str], timeout: float = 3.0) -> list[dict[str, Any]]:
    """The signed state of each node at *peer_urls* that proves the household of *secret* (hello, then
    state, over the household channel), for a caller that is no node yet (the wizard). A peer that cannot
    be reached or refuses is left out (logged); blocks up to about *timeout* per peer."""
    import asyncio

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    async def ask() -> list[dict[str, Any]]:
        identity = Identity(Ed25519PrivateKey.generate())  # a one-off key: the wizard has no node key yet
        client = MeshClient(identity, secret, identity.default_name, 0, mesh_port=0)
        client.http.timeout = httpx.Timeout(timeout)
        states = []
        try:
            for url in dict.fromkeys(peer_urls):
                base = peer_url_of(url)
                try:
                    answer = await client.hello(base)
                    states.append(await client.state(base, answer.node, timeout=timeout))
                except (PeerRefused, httpx.HTTPError, ValueError) as e:
                    log.info("no state from %s: %s", url, e)
        finally:
            await client.aclose()
        return states

    return asyncio.run(ask())


class MeshClient:
    """Signed calls to peers over the household channel for the mesh service: hello, state, and the shared
    httpx client (whose transport checks every answer's certificate)."""

    def __init__(self, identity: Identity, secret: bytes, name: str, api_port: int,
                 context: ssl.SSLContext | None = None, mesh_port: int = DEFAULT_PORT) -> None:
        self.identity = identity
        self.key = derive_key(secret)
        self.name = name
        self.api_port = api_port
        self.mesh_port = mesh_port
        if context is None:
            context = Credentials.issue(identity, Household(secret)).context(server=False)
        # No pooled connection may outlive a dead peer for long; keepalive makes the 1 s polls cheap (and
        # spares a TLS handshake per poll).
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(2.0), trust_env=False,
                                      transport=PinnedTransport(context, limits=httpx.Limits(max_keepalive_connections=32)))

    def headers(self, method: str, url: str, body: bytes = b"") -> dict[str, str]:
        """Signed headers for a request from this node."""
        return signed_headers(self.key, self.identity.node_id, method, url, body)

    async def hello(self, base_url: str, node: str = "") -> HelloAnswer:
        """The peer's proven identity (its certificate must be *node*'s when given); raises PeerRefused or
        httpx.HTTPError."""
        url = base_url + "/mesh/v1/hello"
        challenge = secrets.token_bytes(16)
        body = hello_body(self.identity.node_id, self.name, self.identity.public_bytes, challenge, self.api_port,
                          self.mesh_port)
        headers = self.headers("POST", url, body)
        try:
            resp = await self.http.post(url, content=body, headers=headers | {"Content-Type": "application/json"},
                                        extensions={PIN: node} if node else None)
        except WrongPeer as e:
            raise PeerRefused(str(e)) from None
        except httpx.HTTPError as e:
            if why := tls_refusal(e):
                raise PeerRefused(f"household handshake failed: {why}") from None
            raise
        if resp.status_code != 200:
            raise PeerRefused(f"hello answered {resp.status_code}")
        return check_hello_answer(self.key, headers[H_NONCE], challenge, resp.content, resp.headers.get(H_SIG))

    async def state(self, base_url: str, node: str, timeout: float = 1.5) -> dict[str, Any]:
        """The peer's published state, checked to come from *node* in answer to this request."""
        url = base_url + "/mesh/v1/state"
        headers = self.headers("GET", url)
        try:
            resp = await self.http.get(url, headers=headers, timeout=timeout, extensions={PIN: node})
        except WrongPeer as e:
            raise PeerRefused(str(e)) from None
        except httpx.HTTPError as e:
            if why := tls_refusal(e):
                raise PeerRefused(f"household handshake failed: {why}") from None
            raise
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
