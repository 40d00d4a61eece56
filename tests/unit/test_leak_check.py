"""tests/conftest.py fails a test run that leaves a llama-server or rpc-server of its own running, and
reports which; another run's servers on the same machine are none of its business."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DEMO = "HEARTH_LEAK_DEMO"


if os.environ.get(DEMO):  # only in the pytest of its own that the test below runs

    def test_leaves_a_server_behind(tmp_path: Path) -> None:
        fake = tmp_path / "rpc-server"  # the process's name is what the check looks for
        shutil.copy(shutil.which("sleep") or "/bin/sleep", fake)
        proc = subprocess.Popen([str(fake), "300"], start_new_session=True)
        comm = Path(f"/proc/{proc.pid}/comm")
        while comm.read_text().strip() != "rpc-server":  # exec'd: what a real server long since is
            time.sleep(0.01)


def test_a_run_that_leaves_a_server_running_fails_and_says_which(tmp_path: Path) -> None:
    me = f"{Path(__file__).relative_to(ROOT)}::test_leaves_a_server_behind"
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", me,
                          "--basetemp", str(tmp_path / "inner")], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, DEMO: "1"})
    out = res.stdout + res.stderr
    assert "1 passed" in out, out  # the test itself passed ...
    assert res.returncode == 1, out  # ... and the run failed
    assert "1 llama.cpp server(s) left running by this test run (killed now)" in out, out
    assert f"first seen running after {me}: {tmp_path / 'inner'}" in out, out
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "inner")], capture_output=True, text=True)
    assert left.stdout == "", left.stdout  # and it was killed
