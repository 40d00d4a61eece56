"""The node's HTTP API: ``create_app(runtime)`` builds the FastAPI app the daemon serves with uvicorn.

Every refusal is a 4xx in the dialect of the endpoint (OpenAI's error object on /v1, Ollama's on /api),
with a message that says what to change; validation errors are 400 (not FastAPI's 422) and name the
parameter.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from .. import __version__
from .errors import ApiError, error_response
from .generation import ClientGone
from .guard import Guard
from .keys import ApiKeyError, KeyStore, keys_path
from .runtime import Runtime
from .state import ApiState

log = logging.getLogger(__name__)

DESCRIPTION = """Hearth's node API: OpenAI-compatible (/v1), an Ollama subset (/api), /health and /metrics.
Clients off this machine send `Authorization: Bearer <key>` (`hearth apikey show` on the node)."""


def create_app(runtime: Runtime) -> FastAPI:
    """The API app for *runtime*; makes the first API key if the node has none."""
    from ..page.routes import router as page_router
    from . import node, ollama, v1

    keys = KeyStore(keys_path(runtime.state_dir))
    try:
        keys.ensure_default()
    except ApiKeyError as e:
        log.warning("no API key could be made (%s): only loopback clients can call the API", e.message)
    state = ApiState(runtime=runtime, keys=keys)

    app = FastAPI(title="Hearth", version=__version__, description=DESCRIPTION)
    app.state.hearth = state
    app.include_router(v1.router)
    app.include_router(ollama.router)
    app.include_router(node.router)
    app.include_router(page_router)  # the household page at /, and its /page/v1 endpoints
    for extra in runtime.extra_routers:
        app.include_router(extra)

    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(Guard, state=state)
    return app


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc, request.url.path)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(validation_to_api_error(exc.errors()), request.url.path)


def validation_to_api_error(errors: Any) -> ApiError:
    """The first validation problem as one readable line, naming the parameter (e.g. 'messages.0.role')."""
    errors = list(errors)
    if not errors:
        return ApiError(400, "the request is not valid")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON{': ' + str(detail) if detail else ''}")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Pydantic reports each member of a union; the parameter's own name is what a person needs.
    loc = [p for p in loc if not _is_type_tag(p)]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "is not valid"))
    if first.get("type") == "missing":
        text = f"'{param}' is required" if param else "the request needs a JSON body"
    elif first.get("type") == "extra_forbidden":
        text = f"'{param}' is not a field Hearth knows; remove it (no field is silently ignored)"
    elif param:
        text = f"'{param}': {msg}"
    else:
        text = f"the request body is not valid: {msg}"
    more = len(errors) - 1
    if more:
        text += f" (and {more} more problem{'s' if more > 1 else ''})"
    return ApiError(400, text, param=param)


def _is_type_tag(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "list[str]", "list[TextPart]") or part.startswith(
        ("function-", "constrained-", "list[", "json-or-python"))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    response = error_response(ApiError(exc.status_code, message), request.url.path)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _client_gone(request: Request, exc: Exception) -> Response:
    # Nobody reads this; 499 (nginx's "client closed request") keeps the metrics honest.
    return Response(status_code=499)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.url.path)
    return error_response(ApiError(500, f"internal error: {type(exc).__name__}; the agent logs the details"),
                          request.url.path)
