"""The /mesh/v1 HTTP endpoints peers call, served only on the household channel (mutual TLS, mesh.port).

A request reaches them only through a TLS 1.3 connection that showed a certificate from the household
CA; each one must also carry a valid household signature (defence in depth: a request replayed inside
the window, or one whose TLS layer were ever misconfigured, is still refused). Refused requests are logged
at WARNING with the peer's address and answered 401/403. /mesh/v1/generate streams from this node's
*local* upstreams only, so a forwarded request is never forwarded again. The API port keeps only
/mesh/v1/peers, for `hearth peers` on the node itself (loopback), which carries no prompt or answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from ..serving.types import Finished, GenerationRequest, TokenChunk, UpstreamError
from . import PROTOCOL_VERSION
from .auth import H_NONCE, H_SIG, AuthError, sign_answer

if TYPE_CHECKING:
    from .service import MeshService

log = logging.getLogger(__name__)


def _peer_addr(request: Request) -> str:
    return request.client.host if request.client else "?"


def make_router(mesh: MeshService) -> APIRouter:
    """The APIRouter for *mesh*, served on its household channel."""
    router = APIRouter(prefix="/mesh/v1", tags=["mesh"])
    refusals: dict[tuple[str, str], float] = {}

    async def verified(request: Request) -> str:
        body = await request.body()
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            return mesh.verifier.verify(request.method, path, body, request.headers)
        except AuthError as e:
            addr = _peer_addr(request)
            # Every refusal is logged, but a stranger retrying every few seconds is a WARNING once a minute.
            now = time.monotonic()
            level = logging.WARNING if now - refusals.get((addr, e.message), -1e9) > 60 else logging.DEBUG
            if level == logging.WARNING:
                refusals[(addr, e.message)] = now
                if len(refusals) > 4096:
                    refusals.clear()
            log.log(level, "mesh: refused %s %s from %s: %s", request.method, request.url.path, addr, e.message)
            raise HTTPException(e.status, detail=e.message) from None

    def signed(request: Request, data: Any) -> Response:
        body = json.dumps(data).encode()
        sig = sign_answer(mesh.verifier.key, request.headers.get(H_NONCE, ""), mesh.node, body)
        return Response(body, media_type="application/json", headers={H_SIG: sig})

    @router.post("/hello")
    async def hello(request: Request, sender: str = Depends(verified)) -> Response:
        """Prove this node's household membership and key; learn the caller's."""
        try:
            data = json.loads(await request.body())
            challenge = bytes.fromhex(data["challenge"])
        except (ValueError, KeyError, TypeError):
            raise HTTPException(400, detail="hello needs a hex challenge") from None
        if len(challenge) < 16:
            raise HTTPException(400, detail="challenge too short")
        proof = mesh.identity.sign(b"hearth-hello" + challenge + mesh.node.encode())
        if isinstance(data.get("mesh_port"), int) and data.get("node") != mesh.node:
            mesh.learn(_peer_addr(request), data["mesh_port"])
        return signed(request, {"node": mesh.node, "name": mesh.name, "public_key": mesh.identity.public_bytes.hex(),
                                "proof": proof.hex(), "version": PROTOCOL_VERSION, "api_port": mesh.api_port,
                                "mesh_port": mesh.channel.port})

    @router.get("/state")
    async def state(request: Request, sender: str = Depends(verified)) -> Response:
        """This node's models, load and version, signed."""
        return signed(request, mesh.local_state())

    @router.post("/generate")
    async def generate(request: Request, sender: str = Depends(verified)) -> Response:
        """Stream a GenerationRequest from a local upstream as NDJSON events."""
        try:
            req = GenerationRequest.from_json(json.loads(await request.body()))
        except (ValueError, TypeError) as e:
            raise HTTPException(400, detail=f"bad generation request: {e}") from None
        if req.hops > 1:
            raise HTTPException(508, detail="request already forwarded once (loop)")
        ups = [u for u in mesh.local_upstreams() if u.model == req.model]
        if not ups:
            raise HTTPException(404, detail=f"model '{req.model}' is not loaded on {mesh.name}")
        ups.sort(key=lambda u: -u.load().headroom)
        return StreamingResponse(_stream(mesh, ups, req), media_type="application/x-ndjson")

    @router.post("/embed")
    async def embed(request: Request, sender: str = Depends(verified)) -> JSONResponse:
        """Embeddings from a local upstream."""
        try:
            data = json.loads(await request.body())
            model, inputs = str(data["model"]), [str(x) for x in data["input"]]
        except (ValueError, KeyError, TypeError):
            raise HTTPException(400, detail="embed needs model and input") from None
        ups = [u for u in mesh.local_upstreams() if u.model == model]
        if not ups:
            raise HTTPException(404, detail=f"model '{model}' is not loaded here")
        try:
            vectors, tokens = await ups[0].embed(model, inputs)
        except UpstreamError as e:
            raise HTTPException(e.status, detail=e.message) from None
        return JSONResponse({"embeddings": vectors, "prompt_tokens": tokens})

    @router.get("/models/{name}/info")
    async def model_info(name: str, request: Request, sender: str = Depends(verified)) -> Response:
        """Size and SHA-256 of a model file, signed (the copy is checked against it)."""
        model = _stored(mesh, name)
        sha = model.sha256 or await asyncio.to_thread(mesh.file_sha256, model.path)
        return signed(request, {"name": model.name, "file": model.file, "size": model.size, "sha256": sha})

    @router.get("/models/{name}")
    async def model_file(name: str, sender: str = Depends(verified)) -> FileResponse:
        """The model file itself; honours Range so an interrupted copy resumes."""
        return FileResponse(_stored(mesh, name).path, media_type="application/octet-stream")

    @router.get("/peers")
    async def peers(request: Request, sender: str = Depends(verified)) -> JSONResponse:
        """This node's view of the mesh, for a household member."""
        return JSONResponse(mesh.view())

    return router


def make_local_router(mesh: MeshService) -> APIRouter:
    """The one mesh route on the API port: /mesh/v1/peers for `hearth peers` on this machine (loopback only)."""
    router = APIRouter(prefix="/mesh/v1", tags=["mesh"])

    @router.get("/peers")
    async def peers(request: Request) -> JSONResponse:
        """This node's view of the mesh; from another machine it is a 403 (members ask on the channel)."""
        try:
            local = ipaddress.ip_address(_peer_addr(request)).is_loopback
        except ValueError:
            local = False
        if not local:
            raise HTTPException(403, detail=f"the mesh answers household members on its channel (port {mesh.channel.port})")
        return JSONResponse(mesh.view())

    return router


def _stored(mesh: MeshService, name: str) -> Any:
    for m in mesh.stored_models():
        if name in (m.name, m.file):
            return m
    raise HTTPException(404, detail=f"no model '{name}' in this node's store")


HEARTBEAT_S = 5.0
"""While the model works (a long prompt on a slow CPU, a slow token), a {"type": "working"} line this often
tells the asking node this one is alive: its silence limits then catch a stuck node, not a slow one."""

_WORKING = json.dumps({"type": "working"}).encode() + b"\n"


async def _beating(events: AsyncIterator[Any], every: float) -> AsyncGenerator[Any, None]:
    """*events*, with None yielded after each *every* seconds without one."""
    it = aiter(events)
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(it))
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield None
                continue
            fut, pending = pending, None
            try:
                ev = fut.result()
            except StopAsyncIteration:
                return
            yield ev
    finally:
        if pending is not None and not pending.done():
            pending.cancel()  # the asking node hung up: stop the generation
            with contextlib.suppress(BaseException):
                await pending


async def _stream(mesh: MeshService, ups: list[Any], req: GenerationRequest) -> AsyncIterator[bytes]:
    """NDJSON events from the first local upstream that starts; errors become an error event."""
    for i, up in enumerate(ups):
        got = False
        try:
            # aclosing: when the asking node hangs up, the generation below is cancelled now, not at GC.
            async with contextlib.aclosing(_beating(up.generate(req), HEARTBEAT_S)) as events:
                async for ev in events:
                    if ev is None:
                        yield _WORKING
                    elif isinstance(ev, TokenChunk):
                        got = True
                        extra = ev.to_json()
                        extra.pop("t")
                        yield json.dumps({"type": "token", "text": ev.text, **extra}).encode() + b"\n"
                    elif isinstance(ev, Finished):
                        yield json.dumps({"type": "finished", "finish_reason": ev.finish_reason,
                                          "prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                                          "served_by": mesh.node}).encode() + b"\n"
                        return
        except UpstreamError as e:
            if got or not e.before_first_token or i == len(ups) - 1:
                yield json.dumps({"type": "error", "message": e.message, "status": e.status,
                                  "retry_after": e.retry_after}).encode() + b"\n"
                return
            continue
        yield json.dumps({"type": "error", "message": "the worker ended without finishing", "status": 502}).encode() + b"\n"
        return


