"""The AMD GPU backend: amdgpu's sysfs files for memory, the KFD topology for the gfx target."""

from __future__ import annotations

import os
from pathlib import Path

from .backend import Backend, Findings
from .report import GIB, Gpu
from .sysfs import driver_of, drm_cards, pci_address_of, read_int, read_keyvalues, read_text

AMD = 0x1002

APU_IDS = {
    0x15DD: "Radeon Vega (Raven Ridge)", 0x15D8: "Radeon Vega (Picasso)", 0x1636: "Radeon Graphics (Renoir)",
    0x1638: "Radeon Graphics (Cezanne)", 0x164C: "Radeon Graphics (Lucienne)", 0x163F: "Radeon Graphics (Van Gogh)",
    0x1681: "Radeon 680M (Rembrandt)", 0x164E: "Radeon Graphics (Raphael)", 0x1506: "Radeon 610M (Mendocino)",
    0x15BF: "Radeon 780M (Phoenix)", 0x15C8: "Radeon 740M (Phoenix2)", 0x150E: "Radeon 890M (Strix Point)",
    0x1586: "Radeon 8060S (Strix Halo)", 0x13C0: "Radeon Graphics (Granite Ridge)",
}
"""Device ids of AMD integrated GPUs (APUs share system memory whatever their carve-out)."""

DGPU_NAMES = {
    0x744C: "Radeon RX 7900 XTX/XT", 0x7480: "Radeon RX 7600", 0x747E: "Radeon RX 7800 XT/7700 XT",
    0x73BF: "Radeon RX 6800/6900 XT", 0x73DF: "Radeon RX 6700 XT", 0x73FF: "Radeon RX 6600/6650 XT",
    0x7550: "Radeon RX 9070 XT/9070",
}


def gfx_name(version: int) -> str:
    """KFD's gfx_target_version (110003) as the LLVM target name (gfx1103)."""
    major, minor, step = version // 10000, (version // 100) % 100, version % 100
    return f"gfx{major}{minor:x}{step:x}"


def kfd_targets(root: Path) -> dict[str, str]:
    """PCI address -> gfx target, from /sys/class/kfd/kfd/topology/nodes/*/properties."""
    base = root / "sys/class/kfd/kfd/topology/nodes"
    out: dict[str, str] = {}
    try:
        nodes = sorted(os.listdir(base))
    except OSError:
        return out
    for node in nodes:
        props = read_keyvalues(base / node / "properties")
        version = int(props.get("gfx_target_version", "0") or 0)
        if not version:
            continue  # a CPU node
        location = int(props.get("location_id", "0") or 0)
        domain = int(props.get("domain", "0") or 0)
        # location_id packs the PCI bus, device and function as bus << 8 | dev << 3 | fn.
        address = f"{domain:04x}:{location >> 8:02x}:{(location >> 3) & 0x1F:02x}.{location & 7}"
        out[address] = gfx_name(version)
    return out


class AmdBackend(Backend):
    """AMD Radeon GPUs and APUs driven by amdgpu."""

    name = "amd"

    def probe(self, found: dict[str, Findings]) -> Findings:
        """Read every DRM card whose PCI vendor is AMD."""
        targets = kfd_targets(self.ctx.root)
        gpus = []
        for dev in drm_cards(self.ctx.root):
            if read_int(dev / "vendor", 0) != AMD:
                continue
            device_id = read_int(dev / "device", 0) or 0
            driver = driver_of(dev)
            address = pci_address_of(dev)
            total = read_int(dev / "mem_info_vram_total")
            used = read_int(dev / "mem_info_vram_used")
            # APUs: a known id, or a carve-out too small to be a graphics card's own memory.
            integrated = device_id in APU_IDS or (total is not None and total <= 2 * GIB)
            product = read_text(dev / "product_name")
            name = product or APU_IDS.get(device_id) or DGPU_NAMES.get(device_id) or f"Radeon {device_id:04x}"
            note = None
            if driver != "amdgpu":
                note = f"AMD GPU with driver {driver}" if driver else "AMD GPU present but the amdgpu driver is not loaded"
            elif address not in targets:
                note = "no KFD topology (ROCm cannot use it; Vulkan can)"
            gpus.append(Gpu(
                vendor="amd",
                name=name if name.startswith("AMD") else f"AMD {name}",
                pci_address=address,
                pci_id=f"{AMD:04x}:{device_id:04x}",
                driver=driver,
                integrated=integrated,
                vram_total=total,
                vram_free=(total - used) if total is not None and used is not None else None,
                usable=driver == "amdgpu" and total is not None,
                note=note,
                gfx_target=targets.get(address),
            ))
        usable = any(g.usable for g in gpus)
        reason = None if usable else (gpus[0].note if gpus else "no AMD GPU found")
        return Findings(self.fact(usable, reason, devices=len(gpus)), gpus=gpus)
