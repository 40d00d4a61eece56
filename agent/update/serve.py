"""The read-only route a node serves its verified update files on, to its household's peers only.

``GET /mesh/v1/updates/FILE`` answers SHA256SUMS, its signature and the files that SHA256SUMS lists, from
the verified store, for requests signed with the household key (like every /mesh/v1 route). Nothing can
be written through it, and the receiving node checks the publisher's signature and every hash itself, so
a peer cannot slip in a changed file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse

from .fetch import store_dir
from .sums import SIGNATURE, SUMS, UpdateError, parse_sums

log = logging.getLogger(__name__)


def servable(verified: Path) -> set[str]:
    """Names this node serves: SHA256SUMS, its signature and the files it lists that are present."""
    try:
        listed = parse_sums((verified / SUMS).read_text(encoding="utf-8"))
    except (OSError, UpdateError):
        return set()
    if not (verified / SIGNATURE).is_file():
        return set()
    return {SUMS, SIGNATURE} | {n for n in listed if (verified / n).is_file()}


def make_router(verifier: Any, state_dir: Path) -> APIRouter:
    """The router; *verifier* checks household signatures (hearth.mesh.auth.Verifier)."""
    from ..mesh.auth import AuthError

    router = APIRouter(prefix="/mesh/v1/updates", tags=["mesh"])
    verified = store_dir(state_dir) / "verified"

    @router.get("/{name}")
    async def update_file(name: str, request: Request) -> FileResponse:
        """One verified update file, for household peers."""
        try:
            verifier.verify(request.method, request.url.path, b"", request.headers)
        except AuthError as e:
            log.warning("updates: refused %s from %s: %s", name, request.client.host if request.client else "?", e.message)
            raise HTTPException(e.status, detail=e.message) from None
        if name not in servable(verified):
            raise HTTPException(404, detail="no such update file here")
        return FileResponse(verified / name, media_type="application/octet-stream")

    return router
