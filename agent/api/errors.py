"""API errors in the wire formats clients expect: OpenAI's ``{"error": {...}}`` and Ollama's ``{"error": "..."}``."""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.responses import Response

from ..serving.types import ModelNotFound, UpstreamError

_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", None),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "queue_full"),
    500: ("server_error", None),
    503: ("server_error", "unavailable"),
}


class ApiError(Exception):
    """A request the API refuses: HTTP status, message and (for validation) the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    @classmethod
    def from_upstream(cls, e: UpstreamError) -> ApiError:
        """Map an upstream failure; a status that is not an HTTP error becomes 503."""
        status = e.status if 400 <= e.status <= 599 else 503
        message = f"{e.message} ({e.hint})" if e.hint else e.message
        code = "model_not_found" if isinstance(e, ModelNotFound) else None
        param = "model" if code else getattr(e, "param", None)
        return cls(status, message, param=param, code=code, retry_after=e.retry_after)

    def headers(self) -> dict[str, str]:
        """Retry-After (whole seconds, at least 1) for 429/503 answers that know when to retry."""
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}

    def openai_body(self) -> dict[str, Any]:
        """The OpenAI error object."""
        kind, code = _TYPES.get(self.status, ("invalid_request_error" if self.status < 500 else "server_error", None))
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code or code}}

    def ollama_body(self) -> dict[str, Any]:
        """The Ollama error object."""
        return {"error": self.message}


def is_ollama_path(path: str) -> bool:
    """Ollama-style endpoints answer errors in Ollama's shape."""
    return path.startswith("/api/")


def error_response(err: ApiError, path: str) -> Response:
    """The JSON error response for *path*'s dialect."""
    body = err.ollama_body() if is_ollama_path(path) else err.openai_body()
    return Response(json.dumps(body), status_code=err.status, media_type="application/json", headers=err.headers())


def error_bytes(err: ApiError, path: str) -> bytes:
    """The error body alone (for middleware that answers without Starlette)."""
    body = err.ollama_body() if is_ollama_path(path) else err.openai_body()
    return json.dumps(body).encode()
