"""One child process kept running by the agent: what llama-server (serving/llamaserver.py) and the pool's
rpc-server (pool/rpcserver.py) share.

``Supervised`` starts the program in its own session (a signal meant for the agent's terminal never
reaches it) and bound to the agent's life (it is killed when the agent dies, however the agent dies),
keeps the last lines of its log, restarts it with backoff whenever it exits, and stops it with SIGTERM,
then SIGKILL. A subclass says how one run goes (``_run_once``: launch, wait until it serves, wait for its
exit) and what its log lines tell (``_saw``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
"""prctl(2): the signal the kernel sends this process when its parent dies."""


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child *sig* when its parent dies (PR_SET_PDEATHSIG).

    A program started in its own session otherwise outlives an agent that is killed outright (SIGKILL,
    the out-of-memory killer, a crash; systemd cleans up its unit's cgroup, nothing else does): a
    llama-server keeps its model's memory and an rpc-server its port, so the next agent's could not bind.
    The "parent" is the thread that forks, here the agent's event loop thread, which lives as long as
    the agent. None where there is no prctl (not Linux)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request: no signal would ever come
            os._exit(1)

    return arm


@dataclass
class Backoff:
    """Restart delays that double after each quick failure and reset once a server has run a while."""

    first: float = 0.25
    limit: float = 30.0
    stable_after: float = 60.0
    """A server that ran this long before dying counts as healthy: the next restart is immediate-ish."""
    current: float = field(default=0.0, init=False)

    def next(self, ran_for: float) -> float:
        """The delay before the next start, given how long the last server ran."""
        if ran_for >= self.stable_after or self.current == 0.0:
            self.current = self.first
        else:
            self.current = min(self.limit, self.current * 2)
        return self.current


class Supervised:
    """A supervised program: *label* prefixes its log lines ('model gemma', 'pool'), *program* names it."""

    program = "server"

    def __init__(self, label: str, backoff: Backoff | None = None, logger: logging.Logger = log) -> None:
        self.label = label
        self.backoff = backoff or Backoff()
        self.log = logger
        self.state = "stopped"
        """'starting', 'ready', 'restarting', 'failed' (a start that did not serve, retrying) or 'stopped'."""
        self.error: str | None = None
        self.restarts = 0
        self.pid: int | None = None
        self.ready = asyncio.Event()
        self.log_tail: collections.deque[str] = collections.deque(maxlen=40)
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        """Begin supervising (returns at once; ``ready`` is set once the program serves)."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._supervise(), name=self._task_name())

    def _task_name(self) -> str:
        return self.program

    async def _supervise(self) -> None:
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # supervision must go on whatever happened
                self.log.exception("%s: %s supervisor error", self.label, self.program)
                self.error = str(e)
            self.ready.clear()
            if self._stopping:
                break
            delay = self.backoff.next(time.monotonic() - started)
            self.restarts += 1
            if self.state != "failed":
                self.state = "restarting"
            self.log.warning("%s: restarting %s in %.2fs (%s)", self.label, self.program, delay,
                             self.error or "exited")
            await asyncio.sleep(delay)

    async def _run_once(self) -> None:
        """One run of the program, from its start to its exit (``_launch`` it, ``_reap`` it at the end)."""
        raise NotImplementedError

    async def _launch(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                      log_on_stdout: bool = False) -> tuple[asyncio.subprocess.Process, asyncio.Task[None]]:
        """Start the program and a reader of its log (stderr, or stdout and stderr together)."""
        self.state = "starting" if self.restarts == 0 else self.state
        self.log_tail.clear()
        pipe, devnull = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=devnull, stdout=pipe if log_on_stdout else devnull,
            stderr=asyncio.subprocess.STDOUT if log_on_stdout else pipe, start_new_session=True,
            preexec_fn=die_with_parent())
        self._proc, self.pid = proc, proc.pid
        stream = proc.stdout if log_on_stdout else proc.stderr
        assert stream is not None
        return proc, asyncio.get_running_loop().create_task(self._read_log(stream))

    async def _reap(self, proc: asyncio.subprocess.Process, reader: asyncio.Task[None]) -> None:
        """After a run: the log's last lines read, and the program gone (unless ``stop`` is seeing to it)."""
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(reader, 2.0)
        if proc.returncode is None and not self._stopping:
            await self._kill(proc)

    async def _read_log(self, stream: asyncio.StreamReader) -> None:
        while True:
            raw = await stream.readline()
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            self.log_tail.append(line)
            self._saw(line)
            self.log.debug("%s %s: %s", self.program, self.label, line)

    def _saw(self, line: str) -> None:
        """A line of the program's log (a subclass reads facts from it)."""

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the program: SIGTERM, then SIGKILL after *timeout* seconds."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                await self._kill(proc)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.state = "stopped"
        self.ready.clear()
