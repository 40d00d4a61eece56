"""What every API handler shares: the runtime, the API's metrics and the key store."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from starlette.requests import Request

from .keys import KeyStore
from .metrics import ApiMetrics
from .runtime import Runtime


@dataclass
class ApiState:
    """One per app, at ``app.state.hearth``."""

    runtime: Runtime
    keys: KeyStore
    metrics: ApiMetrics = field(default_factory=ApiMetrics)
    started: float = field(default_factory=time.time)


def api_state(request: Request) -> ApiState:
    """The app's shared state, from inside a handler."""
    return request.app.state.hearth  # type: ignore[no-any-return]
