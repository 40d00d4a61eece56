"""ci/qemu.py's power cycle after an early guest kernel panic (no qemu needed: a stand-in process)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PANIC = b"[    9.2] Oops: int3\n[    9.2] Kernel panic - not syncing: Fatal exception in interrupt\n"


class FakeQemu:
    """Replaces VM.start: each 'boot' writes the next scripted console log and runs a sleeping process."""

    def __init__(self, vm, boots: list[bytes]) -> None:
        self.vm, self.boots, self.started = vm, list(boots), 0

    def __call__(self):
        self.vm.serial_log.write_bytes(self.boots.pop(0))
        self.vm._seen = 0
        self.vm.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.started += 1
        return self.vm


def _vm(harness, tmp_path, boots, monkeypatch):
    vm = harness.VM(tmp_path / "none.raw", workdir=tmp_path)
    fake = FakeQemu(vm, boots)
    monkeypatch.setattr(vm, "start", fake)
    vm.start()
    return vm, fake


def test_an_early_panic_is_power_cycled_and_the_wait_goes_on(harness, tmp_path, monkeypatch):
    vm, fake = _vm(harness, tmp_path, [b"Linux version\n" + PANIC, b"Linux version\nhearth-check: exit 0\n"],
                   monkeypatch)
    try:
        assert vm.wait_for(r"hearth-check: exit (\d+)", 10).group(1) == b"0"
        assert fake.started == 2 and vm.restarts == 1
        assert PANIC in (tmp_path / "serial.panic1.log").read_bytes()  # the evidence is kept
    finally:
        vm.close()


def test_a_panic_after_the_switch_to_the_real_root_fails_the_wait(harness, tmp_path, monkeypatch):
    late = b"Reached target initrd-switch-root.target\n" + PANIC
    vm, fake = _vm(harness, tmp_path, [late], monkeypatch)
    try:
        with pytest.raises(harness.QemuError, match="panicked"):
            vm.wait_for("hearth-check: exit", 10)
        assert fake.started == 1
    finally:
        vm.close()


def test_at_most_two_power_cycles(harness, tmp_path, monkeypatch):
    vm, fake = _vm(harness, tmp_path, [PANIC, PANIC, PANIC], monkeypatch)
    try:
        with pytest.raises(harness.QemuError, match="panicked"):
            vm.wait_for("hearth-check: exit", 10)
        assert fake.started == 3 and vm.restarts == 2
    finally:
        vm.close()
