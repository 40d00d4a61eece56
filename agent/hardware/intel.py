"""The Intel GPU backend: i915 and xe sysfs (device id, integrated or discrete, local memory when discrete)."""

from __future__ import annotations

from pathlib import Path

from .backend import Backend, Findings
from .report import Gpu
from .sysfs import driver_of, drm_cards, pci_address_of, read_int

INTEL = 0x8086

NAMES = {
    0x7D55: "Arc Graphics (Meteor Lake)", 0x7DD5: "Graphics (Meteor Lake)", 0x64A0: "Arc 140V (Lunar Lake)",
    0x7D51: "Arc Graphics (Arrow Lake-H)", 0x46D1: "UHD Graphics (Alder Lake-N)", 0x46A6: "Iris Xe (Alder Lake-P)",
    0x9A49: "Iris Xe (Tiger Lake)", 0xA7A0: "Iris Xe (Raptor Lake-P)", 0x4680: "UHD Graphics 770",
    0x56A0: "Arc A770", 0x56A1: "Arc A750", 0x56A5: "Arc A380", 0xE20B: "Arc B580", 0xE20C: "Arc B570",
}


def local_memory(dev: Path) -> int | None:
    """A discrete card's own memory: xe's per-tile VRAM file, or i915's lmem file where the kernel has it."""
    for name in ("tile0/physical_vram_size_bytes", "tile0/vram0/size", "lmem_total_bytes", "prelim_lmem_total_bytes"):
        value = read_int(dev / name)
        if value:
            return value
    return None


class IntelBackend(Backend):
    """Intel integrated (Iris Xe, Arc iGPU) and discrete (Arc) GPUs."""

    name = "intel"

    def probe(self, found: dict[str, Findings]) -> Findings:
        """Read every DRM card whose PCI vendor is Intel."""
        gpus = []
        for dev in drm_cards(self.ctx.root):
            if read_int(dev / "vendor", 0) != INTEL:
                continue
            device_id = read_int(dev / "device", 0) or 0
            driver = driver_of(dev)
            address = pci_address_of(dev)
            # The integrated GPU always sits at 00:02.0 on the root bus; discrete Arc cards sit behind a bridge.
            integrated = address.endswith(":00:02.0")
            vram = None if integrated else local_memory(dev)
            note = None
            if driver not in ("i915", "xe"):
                note = f"Intel GPU with driver {driver}" if driver else "Intel GPU present but no i915/xe driver loaded"
            elif not integrated and vram is None:
                note = f"{driver} does not expose the card's local memory in sysfs"
            gpus.append(Gpu(
                vendor="intel",
                name="Intel " + NAMES.get(device_id, f"GPU {device_id:04x}"),
                pci_address=address,
                pci_id=f"{INTEL:04x}:{device_id:04x}",
                driver=driver,
                integrated=integrated,
                vram_total=vram,
                vram_free=vram,
                usable=driver in ("i915", "xe"),
                note=note,
            ))
        usable = any(g.usable for g in gpus)
        reason = None if usable else (gpus[0].note if gpus else "no Intel GPU found")
        return Findings(self.fact(usable, reason, devices=len(gpus)), gpus=gpus)
