"""The node's own endpoints: /health (for status checks, load balancers and the image's check unit) and
/metrics (Prometheus)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from .state import api_state

log = logging.getLogger(__name__)

router = APIRouter(tags=["node"])


@router.get("/health", summary="200 when ready, 503 while loading or broken")
async def health(request: Request) -> Response:
    """The runtime's health report; the status code says whether the node can answer now."""
    try:
        body = dict(api_state(request).runtime.health())
    except Exception as e:  # a health check must answer even when the runtime is in trouble
        log.exception("health report failed")
        body = {"status": "error", "warnings": [f"health report failed: {e}"]}
    return JSONResponse(body, status_code=200 if body.get("status") == "ready" else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    """Request counts, tokens, latencies, and the runtime's own gauges (queue depth, ...)."""
    st = api_state(request)
    try:
        extra = dict(st.runtime.metrics())
    except Exception:
        log.exception("runtime metrics failed")
        extra = {}
    return PlainTextResponse(st.metrics.render(extra), media_type="text/plain; version=0.0.4")
