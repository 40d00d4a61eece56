"""Reading procfs/sysfs under a root directory, so tests can point the probe at a fixture tree.

Every reader returns None (never raises) when a file is missing or unreadable: on real machines
files come and go with kernel versions and drivers, and a missing file is a fact, not a failure.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


def read_text(path: Path) -> str | None:
    """The file's text, stripped; None if it cannot be read."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def read_int(path: Path, base: int = 10) -> int | None:
    """An integer file (sysfs writes hex ids as '0x10de'); None if missing or not a number."""
    text = read_text(path)
    if text is None:
        return None
    try:
        return int(text, 0 if base == 0 else base)
    except ValueError:
        try:
            return int(text, 0)
        except ValueError:
            return None


def read_keyvalues(path: Path, sep: str | None = None) -> dict[str, str]:
    """A 'key value' per line file (KFD topology properties); empty if missing."""
    out: dict[str, str] = {}
    for line in (read_text(path) or "").splitlines():
        key, _, value = line.strip().partition(sep) if sep else line.strip().partition(" ")
        if key:
            out[key.strip()] = value.strip()
    return out


def driver_of(device: Path) -> str | None:
    """The kernel driver bound to a device: the name its ``driver`` symlink points at, or None."""
    try:
        return os.path.basename(os.readlink(device / "driver"))
    except OSError:
        return None


_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


def pci_address_of(device: Path) -> str:
    """The PCI address (0000:01:00.0) a sysfs device directory stands for, from where its link resolves."""
    try:
        name = os.path.basename(os.path.realpath(device))
    except OSError:
        name = device.name
    return name if _PCI_ADDRESS.match(name) else ""


def normalize_pci(address: str) -> str:
    """'00000000:01:00.0' (NVML) or '0000:01:00.0' (sysfs) -> '0000:01:00.0'."""
    address = address.strip().lower()
    domain, _, rest = address.partition(":")
    return f"{int(domain or '0', 16):04x}:{rest}" if rest else address


@dataclass(frozen=True)
class PciDevice:
    """One device under /sys/bus/pci/devices."""

    address: str
    vendor: int
    device: int
    pci_class: int
    driver: str | None
    path: Path

    @property
    def pci_id(self) -> str:
        """'10de:2504'."""
        return f"{self.vendor:04x}:{self.device:04x}"


def pci_devices(root: Path, class_prefix: int | None = None) -> list[PciDevice]:
    """PCI devices under root, optionally only those whose class's top byte is *class_prefix* (0x03 = display)."""
    base = root / "sys/bus/pci/devices"
    found = []
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    for name in names:
        path = base / name
        pci_class = read_int(path / "class", 0)
        vendor = read_int(path / "vendor", 0)
        device = read_int(path / "device", 0)
        if pci_class is None or vendor is None or device is None:
            continue
        if class_prefix is not None and pci_class >> 16 != class_prefix:
            continue
        found.append(PciDevice(normalize_pci(name), vendor, device, pci_class, driver_of(path), path))
    return found


def drm_cards(root: Path) -> list[Path]:
    """The ``device`` directories of /sys/class/drm/cardN (not the connectors, not renderD*)."""
    base = root / "sys/class/drm"
    try:
        names = sorted(n for n in os.listdir(base) if re.fullmatch(r"card\d+", n))
    except OSError:
        return []
    return [base / n / "device" for n in names if (base / n / "device").exists()]
