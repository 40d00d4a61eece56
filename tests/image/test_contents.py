"""What the image must contain to work, checked offline (seconds, no boot): the runtime's libraries
resolve, the services are enabled, the boot loaders and the data-partition growth are in place."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib", "usr/lib64")


def needed(lib: Path) -> list[str]:
    """The DT_NEEDED sonames of a shared library (objdump, as on the build host)."""
    out = subprocess.run(["objdump", "-p", str(lib)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"NEEDED\s+(\S+)", out)


def test_model_runtime_libraries_resolve(fs):
    root = fs["root"]
    site = next((root / "usr/lib/hearth/venv/lib").glob("python3*/site-packages"))
    libs = [p for p in site.glob("llama_cpp/lib/*.so*")] + [p for p in site.glob("bin/libggml-cpu-*.so")]
    assert libs, "llama-cpp-python's libraries are missing from the venv"
    ours = {p.name for p in libs} | {p.name for p in (site / "llama_cpp/lib").glob("*")}
    missing = set()
    for lib in libs:
        for soname in needed(lib):
            if soname not in ours and not any((root / d / soname).exists() for d in LIB_DIRS):
                missing.add(f"{soname} (for {lib.name})")
    assert not missing, f"not in the image: {sorted(missing)}"


def test_hearth_command_and_units(fs):
    root = fs["root"]
    hearth = root / "usr/bin/hearth"
    assert hearth.is_symlink() and (root / "usr/lib/hearth/venv/bin/hearth").is_file()
    wants = root / "etc/systemd/system/multi-user.target.wants"
    for unit in ("hearth-agent.service", "hearth-preset.service", "hearth-check.service"):
        assert (wants / unit).is_symlink(), f"{unit} is not enabled by the presets"
    assert not (wants / "ssh.service").exists(), "SSH must be off until a key is configured"
    assert "hearth:" in (root / "etc/passwd").read_text(), "the agent's user is missing"


def test_boot_loaders_and_growth(fs):
    esp = fs["esp"]
    assert list((esp / "EFI/Linux").glob("*.efi")), "no UKI on the ESP"
    assert (esp / "EFI/systemd/systemd-bootx64.efi").exists() or (esp / "EFI/BOOT/BOOTX64.EFI").exists()
    assert (esp / "grub").exists() or list(esp.rglob("grub.cfg")), "no grub configuration for BIOS boots"
    assert (esp / "hearth.yaml.example").exists()
    root = fs["root"]
    assert "Type=var" in (root / "usr/lib/repart.d/20-var.conf").read_text()
    assert "x-systemd.growfs" in (root / "etc/fstab").read_text()
