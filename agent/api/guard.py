"""The API's front door, as plain ASGI (no per-chunk overhead on streams): API keys, the body size limit and
request metrics.

Keys guard the model-serving API (/v1/, /api/) and /metrics. /health and the OpenAPI document stay open,
and routes other parts add (the mesh) authenticate on their own. Clients on loopback may skip the key
(``api.open_loopback``).
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_bytes
from .state import ApiState

PROTECTED = ("/v1/", "/api/", "/metrics")
_BODY_METHODS = {"POST", "PUT", "PATCH"}


def is_loopback(client: tuple[str, int] | None) -> bool:
    """Whether the peer address is on this machine (127.0.0.0/8, ::1, IPv4-mapped loopback)."""
    if not client:
        return False
    try:
        addr = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool(addr.is_loopback or (mapped and mapped.is_loopback))


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return bytes(v)
    return None


class Guard:
    """ASGI middleware: authenticate, cap the body, count the request."""

    def __init__(self, app: ASGIApp, state: ApiState) -> None:
        self.app = app
        self.state = state
        api = state.runtime.config.api
        self.open_loopback = api.open_loopback
        self.max_body = api.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.state.metrics
        started = time.perf_counter()
        status = 0

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.in_flight += 1
        try:
            refusal = self._refuse(scope)
            if refusal is not None:
                await self._answer(refusal, scope, send_counted)
                return
            if scope["method"] in _BODY_METHODS:
                body, err = await self._read_body(scope, receive)
                if err is not None:
                    await self._answer(err, scope, send_counted)
                    return
                receive = _replay(body, receive)
                if scope["path"].startswith(PROTECTED):
                    _as_json(scope)
            await self.app(scope, receive, send_counted)
        finally:
            metrics.in_flight -= 1
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            # A client that hangs up before any answer: nginx's 499, so it is counted, not lost.
            metrics.request_done(endpoint, status or 499, time.perf_counter() - started)

    def _refuse(self, scope: Scope) -> ApiError | None:
        path: str = scope["path"]
        if not path.startswith(PROTECTED):
            return None
        if self.open_loopback and is_loopback(scope.get("client")):
            return None
        auth = _header(scope, b"authorization")
        if not auth:
            return ApiError(401, "this API needs a key: send 'Authorization: Bearer <key>' "
                                 "(on the node, 'hearth apikey show' prints one)")
        scheme, _, token = auth.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return ApiError(401, "the Authorization header must be 'Bearer <key>'")
        if not self.state.keys.check(token.strip()):
            return ApiError(401, "invalid API key: it is not one of this node's keys "
                                 "(on the node, 'hearth apikey list' shows them)")
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, ApiError | None]:
        too_big = ApiError(413, f"request body is larger than {self.max_body} bytes (api.max_body_bytes)")
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return b"", too_big  # refused before reading a byte of it
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", too_big
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks), None

    async def _answer(self, err: ApiError, scope: Scope, send: Send) -> None:
        body = error_bytes(err, scope["path"])
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in err.headers().items()]
        if err.status == 413:
            # The rest of the body is never read; the connection cannot be reused.
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _as_json(scope: Scope) -> None:
    """Read every API body as JSON, whatever its Content-Type: ``curl -d '{...}'`` sends a form type,
    and Ollama's and llama.cpp's servers accept it that way too."""
    headers = scope["headers"]
    for k, v in headers:
        if k == b"content-type":
            if v.startswith(b"application/json"):
                return
            break
    scope["headers"] = [(k, v) for k, v in headers if k != b"content-type"] + [(b"content-type", b"application/json")]


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then the real channel (for disconnects)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return dict(await receive())

    return replay
