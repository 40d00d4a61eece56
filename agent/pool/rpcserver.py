"""This node's llama.cpp ``rpc-server``: the memory and compute it lends to household pools.

ggml's RPC protocol has no authentication and no encryption (anyone who reaches the port reads and writes
the process's memory), so the server binds 127.0.0.1 only; peers reach it through the mesh's channel,
which lets authenticated household members in and nobody else. Started with the agent (an idle
rpc-server holds no model memory: a pool's head allocates what it needs), supervised like llama-server
(restart with backoff), with:

- ``-c``: llama.cpp's tensor cache under the state directory (``<state>/pool/cache/rpc``), so a share
  that came over the network once is read from this node's disk the next time a pool forms;
- this node's model store, named in that folder's ``stores`` file: Hearth's rpc-server (runtime patch 0002)
  looks a weight the pool's head announces by hash up in the store's GGUF files when the cache has no
  file of that hash, so a member that already holds the model loads its share from its own disk, nothing
  of it crosses the network, and the cache keeps no second copy. Each store file is hashed once (at the
  server's start, in a thread that may start before the nice below applies) and its index kept beside
  the cache;
- a hard memory ceiling (RLIMIT_DATA at the RAM offered plus room for one tensor in flight) and a lower
  CPU priority (nice 10), so pool work cannot take what the node's own model needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..fsutil import atomic_write
from ..serving.supervisor import Backoff, Supervised

log = logging.getLogger(__name__)

NICE = 10
"""CPU priority of pool work: under contention the node's own llama-server (nice 0) gets ~10x the CPU."""
IN_FLIGHT_SLACK = 1 << 30
"""Room above the RAM offer: rpc-server holds one whole tensor in a receive buffer while it loads it,
plus its own code and the backends' state."""


def cache_dir(state_dir: Path) -> Path:
    """Where llama.cpp's RPC tensor cache lives (rpc-server appends ``rpc/``)."""
    return state_dir / "pool" / "cache"


def write_stores(state_dir: Path, stores: Sequence[Path]) -> Path:
    """Name the model stores rpc-server may load weights from (``<cache>/rpc/stores``: one folder or GGUF
    file per line, written atomically); no stores, no file."""
    path = cache_dir(state_dir) / "rpc" / "stores"
    if stores:
        atomic_write(path, "".join(f"{Path(s).resolve()}\n" for s in stores))
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return path


class RpcServer(Supervised):
    """One supervised rpc-server on 127.0.0.1:*port* exposing *devices* (llama.cpp names: CPU, Vulkan0)."""

    program = "rpc-server"

    def __init__(self, port: int, devices: Sequence[str] = ("CPU",), *, state_dir: Path, threads: int = 0,
                 ram_limit: int = 0, binary: Path | None = None, backoff: Backoff | None = None,
                 on_ready: Callable[[], None] | None = None, nice: int = NICE,
                 stores: Sequence[Path] = ()) -> None:
        super().__init__("pool", backoff, log)
        self.port = port
        self.devices = tuple(devices)
        self.state_dir = state_dir
        self.threads = threads
        self.ram_limit = ram_limit
        """Bytes of RAM offered (0: no ceiling set)."""
        self.binary = binary
        self.on_ready = on_ready
        self.nice = nice
        self.stores = tuple(stores)
        """Model stores (folders of GGUF files) whose weights a pool's head need not send."""

    @property
    def address(self) -> str:
        """'127.0.0.1:PORT', what a local llama-server puts in ``--rpc``."""
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        """rpc-server's command line (its flags: -H host, -p port, -t threads, -d devices, -c cache)."""
        if self.binary is not None:
            program = str(self.binary)
        else:
            from .. import llamacpp

            program = str(llamacpp.server_binary("rpc-server"))
        args = [program, "-H", "127.0.0.1", "-p", str(self.port), "-c", "-d", ",".join(self.devices)]
        if self.threads:
            args += ["-t", str(self.threads)]
        return args

    def env(self) -> dict[str, str]:
        """The environment: llama.cpp's cache folder set to the state directory's."""
        return {**os.environ, "LLAMA_CACHE": str(cache_dir(self.state_dir))}

    async def _run_once(self) -> None:
        cache_dir(self.state_dir).mkdir(parents=True, exist_ok=True)
        write_stores(self.state_dir, self.stores)
        proc, reader = await self._launch(self.argv(), env=self.env(), log_on_stdout=True)
        self._confine(proc.pid)
        try:
            if await self._wait_listening(proc):
                self.state, self.error = "ready", None
                self.ready.set()
                log.info("pool: rpc-server ready on %s (pid %d, devices %s, RAM ceiling %s)", self.address,
                         proc.pid, ",".join(self.devices), f"{self.ram_limit >> 20} MiB" if self.ram_limit else "none")
                if self.on_ready is not None:
                    self.on_ready()
            code = await proc.wait()
            if not self._stopping:
                what = "was killed" if code == -signal.SIGKILL else f"exited with status {code}"
                last = self.log_tail[-1].strip() if self.log_tail else ""
                self.error = f"rpc-server {what}" + (f": {last}" if last and code != -signal.SIGKILL else "")
                log.error("pool: %s", self.error)
        finally:
            await self._reap(proc, reader)

    def _confine(self, pid: int) -> None:
        """Lower the server's CPU priority and cap its memory, right after it started (before it allocates:
        an idle rpc-server holds nothing until a pool's head asks)."""
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, pid, self.nice)
        if self.ram_limit:
            ceiling = self.ram_limit + IN_FLIGHT_SLACK
            try:
                resource.prlimit(pid, resource.RLIMIT_DATA, (ceiling, ceiling))
            except (OSError, ValueError) as e:
                log.warning("pool: cannot cap rpc-server's memory: %s", e)

    async def _wait_listening(self, proc: asyncio.subprocess.Process, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                return False
            # Look for the listening socket rather than connecting: rpc-server serves one client at a time,
            # so a probe connection would sit in its queue (and its banner is block-buffered on a pipe).
            if _listening(self.port):
                return True
            await asyncio.sleep(0.05)
        self.error = f"rpc-server did not listen on {self.address} within {timeout:.0f}s"
        return False


def _listening(port: int) -> bool:
    """True when something listens on 127.0.0.1:*port* (read from /proc, without connecting)."""
    want = f"0100007F:{port:04X}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[1] == want and fields[3] == "0A":  # 0A: LISTEN
                return True
        return False
    return _connectable(port)


def _connectable(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False
