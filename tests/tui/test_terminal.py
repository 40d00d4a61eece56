"""The real entry point on a pseudo-terminal, as on a serial line: TERM=vt220, 80x24, keyboard only."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")


@pytest.mark.parametrize("term", ["vt220", "linux"])
def test_wizard_starts_on_a_terminal_and_quits(root: Path, term: str) -> None:
    """hearth-firstboot draws its first screen in 80x24 on TERM=vt220/linux and leaves with exit 1 (not set up)."""
    (root / "boot").mkdir()
    (root / "boot/hearth.yaml").write_text("node:\n  name: Not Valid\n")
    env = {**os.environ, "TERM": term, "LANG": "C.UTF-8", "COLUMNS": "80", "LINES": "24"}
    child = pexpect.spawn(sys.executable, ["-m", "hearth_firstboot.app", "--root", str(root)]
                          + (["--ascii"] if term == "vt220" else []),
                          env=env, dimensions=(24, 80), timeout=60, encoding="utf-8", codec_errors="replace")
    try:
        child.expect("Welcome")
        child.expect("Keyboard layout")
        child.expect("preset on the stick was not used")
        out = child.before or ""
        assert "\x1b[?1000h" not in out, "no mouse tracking on a serial line"
        child.sendcontrol("q")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 1
    assert not (root / "var/lib/hearth/configured").exists()


def test_wizard_draws_on_the_terminal_when_stderr_goes_elsewhere(root: Path, tmp_path: Path) -> None:
    """Under systemd with StandardError=journal (or with 2> redirected) Textual, which draws on stderr,
    would draw into the journal and leave the console blank; the wizard takes its terminal back."""
    elsewhere = tmp_path / "stderr.txt"
    log = tmp_path / "firstboot.log"
    env = {**os.environ, "TERM": "vt220", "LANG": "C.UTF-8", "HEARTH_FIRSTBOOT_LOG": str(log)}
    script = 'exec "$0" -m hearth_firstboot.app --root "$1" --ascii 2>"$2"'
    child = pexpect.spawn("sh", ["-c", script, sys.executable, str(root), str(elsewhere)],
                          env=env, dimensions=(24, 80), timeout=60, encoding="utf-8", codec_errors="replace")
    try:
        child.expect("Welcome")
        child.expect("Keyboard layout")
        child.sendcontrol("q")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 1
    assert "Welcome" not in elsewhere.read_text(errors="replace")
    assert "stderr is not the terminal" in log.read_text()


def test_sigterm_after_set_up_elsewhere_is_a_clean_exit(root: Path) -> None:
    """firstboot-done stops the wizard on the other consoles once one has set the node up: the stopped
    one restores its terminal and exits 0, so systemd does not list it as failed."""
    import signal

    env = {**os.environ, "TERM": "vt220", "LANG": "C.UTF-8"}
    child = pexpect.spawn(sys.executable, ["-m", "hearth_firstboot.app", "--root", str(root), "--ascii"],
                          env=env, dimensions=(24, 80), timeout=60, encoding="utf-8", codec_errors="replace")
    try:
        child.expect("Keyboard layout")
        (root / "var/lib/hearth").mkdir(parents=True, exist_ok=True)
        (root / "var/lib/hearth/configured").write_text("")
        child.kill(signal.SIGTERM)
        child.expect(pexpect.EOF)
        out = child.before or ""
    finally:
        child.close(force=True)
    assert child.exitstatus == 0 and child.signalstatus is None
    assert "\x1b[?1049l" in out, "the alternate screen was left"
