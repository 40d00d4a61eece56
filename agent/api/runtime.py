"""What the API needs from the node it serves: the contract between ``create_app`` and the daemon.

The daemon's ``Node`` implements ``Runtime``; unit tests implement it with a fake router. The API never
reaches past this interface into workers or the mesh.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fastapi import APIRouter

    from ..config import Config
    from ..serving.types import Router


class Runtime(Protocol):
    """The node as the API sees it."""

    config: Config
    """The node's configuration (api.* settings: open_loopback, max_body_bytes, port)."""
    router: Router
    """Where every generation and embedding goes (local workers and peers alike)."""
    state_dir: Path
    """Where the API keeps its key file (``<state_dir>/api-keys``)."""
    extra_routers: list[APIRouter]
    """Routes other parts add (mesh, hardware). They are not behind API keys: they authenticate on
    their own (the mesh with the household secret). Read once, when the app is created."""

    def health(self) -> dict[str, Any]:
        """``{"status": "loading"|"ready"|"error", "models": {...}, "warnings": [...], ...}``;
        /health answers 200 only when status is "ready"."""
        ...

    def metrics(self) -> dict[str, float]:
        """Counters and gauges the node keeps (queue depth, worker restarts, ...), by name; /metrics
        exports each as ``hearth_<name>``."""
        ...
