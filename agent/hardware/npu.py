"""The NPU backend: /sys/class/accel/accel* by driver (intel_vpu, amdxdna), plus NPUs whose driver is missing."""

from __future__ import annotations

import os
from pathlib import Path

from .backend import Backend, Findings
from .report import Npu
from .sysfs import driver_of, pci_address_of, pci_devices, read_int, read_text

DRIVERS = {"intel_vpu": ("intel", "Intel NPU"), "amdxdna": ("amd", "AMD XDNA NPU")}

KNOWN = {
    (0x8086, 0x7D1D): ("intel", "Intel NPU (Meteor Lake)", "intel/vpu/vpu_37xx"),
    (0x8086, 0xAD1D): ("intel", "Intel NPU (Arrow Lake)", "intel/vpu/vpu_37xx"),
    (0x8086, 0x643E): ("intel", "Intel NPU (Lunar Lake)", "intel/vpu/vpu_40xx"),
    (0x8086, 0xB03E): ("intel", "Intel NPU (Panther Lake)", "intel/vpu/vpu_50xx"),
    (0x1022, 0x1502): ("amd", "AMD XDNA NPU (Phoenix/Hawk Point)", "amdnpu/1502_00"),
    (0x1022, 0x17F0): ("amd", "AMD XDNA 2 NPU (Strix)", "amdnpu/17f0_"),
}
"""PCI ids of NPUs: vendor, name and where linux-firmware keeps their firmware (a path prefix)."""


def firmware_present(root: Path, prefix: str) -> str | None:
    """The first firmware file under /lib/firmware (or /usr/lib/firmware) whose path starts with *prefix*."""
    for base in ("usr/lib/firmware", "lib/firmware"):
        directory, _, stem = (root / base / prefix).as_posix().rpartition("/")
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if not name.startswith(stem):
                continue
            found = f"/{base}/{prefix.rpartition('/')[0]}/{name}"
            if os.path.isdir(f"{directory}/{name}"):  # amdnpu/<id>_<rev>/npu.sbin
                inner = sorted(os.listdir(f"{directory}/{name}"))
                if not inner:
                    continue
                found += f"/{inner[0]}"
            return found
    return None


class NpuBackend(Backend):
    """Neural processing units: Intel NPU (intel_vpu) and AMD XDNA (amdxdna)."""

    name = "npu"

    def probe(self, found: dict[str, Findings]) -> Findings:
        """Read /sys/class/accel and PCI for NPUs."""
        npus: list[Npu] = []
        seen: set[str] = set()
        base = self.ctx.path("/sys/class/accel")
        try:
            names = sorted(n for n in os.listdir(base) if n.startswith("accel"))
        except OSError:
            names = []
        for name in names:
            dev = base / name / "device"
            driver = driver_of(dev)
            vendor_id = read_int(dev / "vendor", 0) or 0
            device_id = read_int(dev / "device", 0) or 0
            known = KNOWN.get((vendor_id, device_id))
            vendor, label = DRIVERS.get(driver or "", (known[0], known[1]) if known else ("unknown", f"NPU ({driver})"))
            if known:
                label = known[1]
            address = pci_address_of(dev)
            seen.add(address)
            npus.append(Npu(
                vendor=vendor, name=label, pci_address=address, pci_id=f"{vendor_id:04x}:{device_id:04x}",
                driver=driver, state=read_text(dev / "power/runtime_status"),
                firmware=firmware_present(self.ctx.root, known[2]) if known else None,
                usable=driver in DRIVERS,
                note=None if driver in DRIVERS else f"accelerator with driver {driver}: not a known NPU",
            ))
        for d in pci_devices(self.ctx.root):
            known = KNOWN.get((d.vendor, d.device))
            if not known or d.address in seen:
                continue
            driver_name = "intel_vpu" if known[0] == "intel" else "amdxdna"
            npus.append(Npu(
                vendor=known[0], name=known[1], pci_address=d.address, pci_id=d.pci_id, driver=d.driver,
                firmware=firmware_present(self.ctx.root, known[2]), usable=False,
                note=f"{known[1]} present but the {driver_name} driver is not loaded",
            ))
        usable = any(n.usable for n in npus)
        reason = None if usable else (npus[0].note if npus else "no NPU found")
        return Findings(self.fact(usable, reason, devices=len(npus)), npus=npus)
