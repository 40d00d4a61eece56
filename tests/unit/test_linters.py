"""Linters run as tests (as mkosi's test_linters.py does): ruff over the tree, mypy over the code."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


def test_ruff() -> None:
    run = subprocess.run([_tool("ruff"), "check", "agent", "firstboot", "profiles", "tests", "bench", "ci"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_mypy() -> None:
    run = subprocess.run([_tool("mypy"), "agent", "firstboot"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_agent_never_imports_textual() -> None:
    """The daemon must not pull in the wizard's UI toolkit (a boundary, as Harlequin enforces)."""
    code = (
        "import importlib, sys\n"
        "for name in ('hearth.cli', 'hearth.config', 'hearth.daemon', 'hearth.api.app', 'hearth.mesh'):\n"
        "    importlib.import_module(name)\n"
        "print('textual' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"
