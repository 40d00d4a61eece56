"""The NVIDIA backend: NVML (through the nvml seam) for names and memory, sysfs for cards NVML cannot see."""

from __future__ import annotations

from .backend import Backend, Findings
from .nvml import NvmlUnavailable, PynvmlSource, RecordedSource
from .report import Gpu
from .sysfs import PciDevice, normalize_pci, pci_devices

NVIDIA = 0x10DE


class NvidiaBackend(Backend):
    """NVIDIA GPUs."""

    name = "nvidia"

    def _source(self) -> object:
        if self.ctx.nvml is not None:
            return self.ctx.nvml
        if self.ctx.is_live:
            return PynvmlSource()
        # NVML talks to the kernel driver, not to files, so a fixture tree carries a recording instead.
        recorded = self.ctx.path("/nvml.json")
        if recorded.exists():
            return RecordedSource.from_file(recorded)
        return RecordedSource({"error": "NVMLError_LibraryNotFound"})

    def probe(self, found: dict[str, Findings]) -> Findings:
        """List NVIDIA GPUs from NVML, plus PCI devices with no (or the wrong) driver."""
        pci = {d.address: d for d in pci_devices(self.ctx.root, class_prefix=0x03) if d.vendor == NVIDIA}
        bound = {a: d for a, d in pci.items() if d.driver == "nvidia"}
        gpus: list[Gpu] = []
        reason: str | None = None
        try:
            if not bound and pci:
                raise NvmlUnavailable("no NVIDIA GPU has the nvidia driver bound")
            data = self._source().read()  # type: ignore[attr-defined]
        except NvmlUnavailable as e:
            reason = str(e)
            data = {"devices": []}
        for dev in data.get("devices", []):
            address = normalize_pci(str(dev.get("pci_bus_id", "")))
            pci.pop(address, None)
            gpus.append(Gpu(
                vendor="nvidia",
                name=str(dev.get("name") or "NVIDIA GPU"),
                pci_address=address,
                pci_id=f"{NVIDIA:04x}:{bound[address].device:04x}" if address in bound else "",
                driver="nvidia",
                integrated=False,
                vram_total=dev.get("memory_total"),
                vram_free=dev.get("memory_free"),
                usable=bool(dev.get("memory_total")),
                uuid=dev.get("uuid"),
                driver_version=data.get("driver_version"),
                compute_capability=dev.get("compute_capability"),
            ))
        for d in pci.values():  # seen on the bus but not through NVML
            gpus.append(_unmanaged(d, reason))
        if gpus and all(not g.usable for g in gpus):
            reason = gpus[0].note
        elif not gpus and reason is None:
            reason = "no NVIDIA GPU found"
        return Findings(self.fact(any(g.usable for g in gpus), None if any(g.usable for g in gpus) else reason,
                                  devices=len(gpus)), gpus=gpus)


def _unmanaged(d: PciDevice, nvml_reason: str | None) -> Gpu:
    if d.driver is None:
        note = "NVIDIA GPU present but driver not loaded (install the nvidia driver: build the nvidia image profile)"
    elif d.driver == "nouveau":
        note = "NVIDIA GPU runs the nouveau driver, which has no CUDA (use the nvidia driver)"
    elif d.driver == "vfio-pci":
        note = "NVIDIA GPU is bound to vfio-pci (passed through to a virtual machine)"
    else:
        note = f"NVIDIA GPU with driver {d.driver} but NVML does not see it" + (f": {nvml_reason}" if nvml_reason else "")
    return Gpu(vendor="nvidia", name=f"NVIDIA GPU {d.pci_id}", pci_address=d.address, pci_id=d.pci_id,
               driver=d.driver, integrated=False, usable=False, note=note)
