"""The shared supervisor (hearth.serving.supervisor): a program the agent started never outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

AGENT = r"""
import asyncio, sys
from hearth.serving.supervisor import Supervised

class Sleeper(Supervised):
    program = "sleep"

    async def _run_once(self):
        proc, reader = await self._launch(["sleep", "300"])
        try:
            print(proc.pid, flush=True)
            await proc.wait()
        finally:
            await self._reap(proc, reader)

async def main():
    Sleeper("test").start()
    await asyncio.sleep(300)

asyncio.run(main())
"""


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it is dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_supervised_program_dies_with_an_agent_killed_outright() -> None:
    agent = subprocess.Popen([sys.executable, "-c", AGENT], stdout=subprocess.PIPE, text=True)
    assert agent.stdout is not None
    child = int(agent.stdout.readline())
    try:
        assert alive(child)
        assert os.getsid(child) != os.getsid(agent.pid)  # its own session: the agent's terminal signals miss it
        agent.send_signal(signal.SIGKILL)  # no finally, no stop(): only the kernel can end the child now
        agent.wait(10)
        deadline = time.monotonic() + 5
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child)
    finally:
        agent.kill()
        if alive(child):
            os.kill(child, signal.SIGKILL)
