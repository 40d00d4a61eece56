"""Fetch the model a node should serve when it is not in the store yet, in the background.

A node whose wizard chose ``qwen2.5-7b-instruct`` (or whose profile picked it for ``auto``) comes up with
an empty store. The agent does not exit for that: the API and the mesh start, and an :class:`Acquisition`
fetches the file, first from a household peer (LAN, :func:`hearth.mesh.copy.pull_from_peers`), else from
the catalogue's sources (:func:`hearth.models.download.pull`, which resumes from its journal after a
restart). The blocking transfer runs in a thread so the event loop (API, watchdog) keeps going. A failure
(no network, a full disk, a bad hash) is kept as a one-line error and retried with a doubling delay,
30 s up to 10 min; ``HEARTH_ACQUIRE_BACKOFF=FIRST[,MAX]`` (seconds) changes that, for tests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..errors import HearthError

log = logging.getLogger(__name__)

BACKOFF_FIRST = 30.0
BACKOFF_MAX = 600.0


def backoff_from_env(default: tuple[float, float] = (BACKOFF_FIRST, BACKOFF_MAX)) -> tuple[float, float]:
    """(first, max) retry delays in seconds, from ``$HEARTH_ACQUIRE_BACKOFF`` ('30' or '30,600')."""
    raw = os.environ.get("HEARTH_ACQUIRE_BACKOFF", "").strip()
    if not raw:
        return default
    try:
        parts = [float(p) for p in raw.split(",")]
    except ValueError:
        log.warning("HEARTH_ACQUIRE_BACKOFF=%r is not 'FIRST[,MAX]' seconds; using %s", raw, default)
        return default
    first = max(parts[0], 0.01)
    return first, max(parts[1] if len(parts) > 1 else default[1], first)


def _human(n: float) -> str:
    from ..models.store import human_bytes

    return human_bytes(n)


def _default_fetch(config: Any, name: str, progress: Callable[[int, int | None, float], None],
                   should_stop: Callable[[], bool], say: Callable[[str], None]) -> Path:
    """Peer first (when the mesh is on), then the catalogue's sources; the stored file's path."""
    from ..models.download import pull
    from ..models.store import Store

    if getattr(config.mesh, "enabled", False):
        try:
            from ..mesh.copy import pull_from_peers
        except ImportError:
            pull_from_peers = None  # type: ignore[assignment]
        if pull_from_peers is not None:
            say("peer")
            try:
                copied = pull_from_peers(config, name, progress=progress)
            except HearthError as e:
                log.warning("copy of %s from a peer failed: %s", name, e.message)
                copied = None
            if copied is not None:
                return Path(copied.path)
    say("catalogue")
    return Path(pull(Store.from_config(config), name, progress=progress, should_stop=should_stop).path)


class Acquisition:
    """One catalogue model being fetched into the store; *on_ready(path)* runs (in the loop) when it is there."""

    def __init__(self, config: Any, name: str, on_ready: Callable[[Path], Awaitable[None]], *,
                 size_hint: int | None = None, backoff: tuple[float, float] | None = None,
                 fetch: Callable[..., Path] | None = None) -> None:
        self.config = config
        self.name = name
        self.on_ready = on_ready
        self.state = "waiting"
        """'waiting', 'downloading', 'retrying' (after an error, until the next try), 'done', 'failed' (the
        file came but would not start) or 'stopped'."""
        self.done_bytes = 0
        self.total_bytes = size_hint
        self.rate = 0.0
        self.via = ""
        """'peer' or 'catalogue': where the current try fetches from."""
        self.error: str | None = None
        self.attempts = 0
        self.retry_at: float | None = None
        self.backoff = backoff or backoff_from_env()
        self._fetch = fetch or _default_fetch
        self._stop = threading.Event()
        self.task: asyncio.Task[None] | None = None

    # --- what health shows ----------------------------------------------------------------------------

    def line(self) -> str:
        """'downloading qwen2.5-7b-instruct: 34% (1.4 of 4.1 GiB)', or the error and when the next try is."""
        if self.state == "failed" and self.error:
            return self.error
        if self.state == "retrying" and self.error:
            wait = max(0, round((self.retry_at or time.monotonic()) - time.monotonic()))
            return f"download of {self.name} failed: {self.error}; retrying in {wait} s"
        if self.state == "done":
            return f"downloaded {self.name}"
        total = self.total_bytes
        if not self.done_bytes:
            return f"downloading {self.name}: starting"
        if total:
            pct = min(100, int(self.done_bytes * 100 / total))
            return f"downloading {self.name}: {pct}% ({_of(self.done_bytes, total)})"
        return f"downloading {self.name}: {_human(self.done_bytes)}"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for /health."""
        return {"model": self.name, "state": self.state, "bytes": self.done_bytes, "total": self.total_bytes,
                "bytes_per_second": round(self.rate), "via": self.via or None, "error": self.error,
                "attempts": self.attempts, "line": self.line()}

    # --- running ---------------------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Start fetching in the background; the task is kept here (a strong reference)."""
        self.task = asyncio.get_running_loop().create_task(self.run(), name=f"acquire {self.name}")
        return self.task

    async def run(self) -> None:
        """Fetch until the model is in the store (retrying with backoff), then hand it to *on_ready*."""
        delay = self.backoff[0]
        while not self._stop.is_set():
            self.attempts += 1
            self.state, self.retry_at = "downloading", None
            try:
                path = await asyncio.to_thread(self._fetch, self.config, self.name, self._progress,
                                               self._stop.is_set, self._say)
            except HearthError as e:
                if self._stop.is_set():
                    break
                self._failed(e.message + (f" ({e.hint})" if e.hint else ""), delay)
            except OSError as e:  # a filesystem surprise outside the store's own checks
                if self._stop.is_set():
                    break
                self._failed(f"{e.strerror or e}", delay)
            else:
                log.info("%s is in the store: %s", self.name, path)
                try:
                    await self.on_ready(path)
                except Exception as e:  # the file is here but cannot be served: say so, do not retry
                    log.exception("cannot serve %s", path)
                    self.state, self.error = "failed", f"{path.name} is in the store but cannot be served: {e}"
                    return
                self.state, self.error = "done", None
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])
        self.state = "stopped"

    def _failed(self, message: str, delay: float) -> None:
        self.error = message
        self.state = "retrying"
        self.retry_at = time.monotonic() + delay
        log.error("download of %s failed: %s; retrying in %.0f s", self.name, message, delay)

    def _progress(self, done: int, total: int | None, rate: float) -> None:
        # called from the download thread; plain attribute stores are atomic enough for a progress line
        self.done_bytes = done
        if total:
            self.total_bytes = total
        self.rate = rate
        if self.error:
            self.error = None

    def _say(self, via: str) -> None:
        self.via = via

    async def stop(self) -> None:
        """Stop fetching; the partial file and its journal stay, so the next start resumes."""
        self._stop.set()
        task = self.task
        if task is None or task.done():
            return
        task.cancel()
        # The thread notices the flag at its next chunk; do not wait for a stuck connection here.
        await asyncio.gather(task, return_exceptions=True)
        if self.state != "done":
            self.state = "stopped"


def _of(done: float, total: float) -> str:
    """'1.4 of 4.1 GiB' for big files (one unit reads best), '300.0 KiB of 1.2 MiB' for small ones."""
    if total >= 1 << 30:
        return f"{done / (1 << 30):.1f} of {total / (1 << 30):.1f} GiB"
    return f"{_human(done)} of {_human(total)}"
