"""The hardware report over HTTP: GET /hearth/v1/hardware (the daemon adds this router to its app)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter

from . import Report, probe

router = APIRouter()
"""Include with ``app.include_router(router)`` (the daemon does, through runtime.extra_routers)."""

CACHE_SECONDS = 5.0
"""A wizard or a peer polling the endpoint gets the same report for this long (probing reads sysfs and NVML)."""

_cache: list[tuple[float, Report]] = []


async def current_report() -> Report:
    """The node's report, probed at most once every CACHE_SECONDS, off the event loop."""
    now = time.monotonic()
    if _cache and now - _cache[0][0] < CACHE_SECONDS:
        return _cache[0][1]
    report = await asyncio.to_thread(probe)
    _cache[:] = [(now, report)]
    return report


@router.get("/hearth/v1/hardware", summary="What hardware this node has and what llama.cpp can use")
async def hardware() -> dict[str, Any]:
    """The node's hardware report (the same JSON as ``hearth hardware --json``)."""
    return (await current_report()).to_dict()
