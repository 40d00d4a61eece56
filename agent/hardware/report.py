"""What the hardware probe found: plain frozen dataclasses that turn into JSON and back.

The same shape is printed by ``hearth hardware --json``, served at ``/hearth/v1/hardware`` and read
back from peers, so ``Report.from_dict(report.to_dict()) == report``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class Cpu:
    """The processor: model, physical cores, hardware threads and the vector flags llama.cpp cares about."""

    model: str = "unknown"
    vendor: str = "unknown"
    arch: str = "x86_64"
    cores: int = 1
    threads: int = 1
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Gpu:
    """One graphics device, from sysfs and (for NVIDIA) NVML; memory in bytes, None where unknown."""

    vendor: str
    name: str
    pci_address: str = ""
    pci_id: str = ""
    driver: str | None = None
    integrated: bool = False
    vram_total: int | None = None
    vram_free: int | None = None
    usable: bool = False
    note: str | None = None
    uuid: str | None = None
    driver_version: str | None = None
    compute_capability: str | None = None
    gfx_target: str | None = None


@dataclass(frozen=True)
class Npu:
    """One neural processing unit under /sys/class/accel (or a PCI one whose driver is missing)."""

    vendor: str
    name: str
    pci_address: str = ""
    pci_id: str = ""
    driver: str | None = None
    state: str | None = None
    firmware: str | None = None
    usable: bool = False
    note: str | None = None


@dataclass(frozen=True)
class BackendFact:
    """What one probe backend concluded: whether its library/driver works, and why not when it does not."""

    backend: str
    available: bool
    reason: str | None = None
    devices: int = 0


@dataclass(frozen=True)
class LlamaCpp:
    """What the llama.cpp runtime in this image reports: can it offload, and to which devices."""

    available: bool = False
    reason: str | None = None
    gpu_offload: bool | None = None
    devices: tuple[dict[str, Any], ...] = ()
    cpu_variant: str | None = None
    """Which of the wheel's CPU builds ggml picked for this CPU (x64, haswell, skylakex, sapphirerapids...)."""


@dataclass(frozen=True)
class Report:
    """Everything the probe found on one node."""

    cpu: Cpu = field(default_factory=Cpu)
    memory: int = 0
    memory_available: int = 0
    gpus: tuple[Gpu, ...] = ()
    npus: tuple[Npu, ...] = ()
    backends: tuple[BackendFact, ...] = ()
    llama_cpp: LlamaCpp = field(default_factory=LlamaCpp)
    root: str = "/"

    @property
    def usable_gpus(self) -> tuple[Gpu, ...]:
        """Discrete GPUs with a working driver and known memory: where a model can be fully offloaded."""
        return tuple(g for g in self.gpus if g.usable and not g.integrated and g.vram_total)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["cpu"]["flags"] = list(self.cpu.flags)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """The inverse of to_dict (a peer's or an API's JSON); unknown keys are ignored."""

        def build(kind: type, value: Any) -> Any:
            names = {f.name for f in dataclasses.fields(kind)}
            return kind(**{k: v for k, v in (value or {}).items() if k in names})

        cpu = build(Cpu, data.get("cpu"))
        cpu = dataclasses.replace(cpu, flags=tuple(cpu.flags))
        llama = build(LlamaCpp, data.get("llama_cpp"))
        llama = dataclasses.replace(llama, devices=tuple(llama.devices))
        return cls(
            cpu=cpu,
            memory=int(data.get("memory") or 0),
            memory_available=int(data.get("memory_available") or 0),
            gpus=tuple(build(Gpu, g) for g in data.get("gpus") or ()),
            npus=tuple(build(Npu, n) for n in data.get("npus") or ()),
            backends=tuple(build(BackendFact, b) for b in data.get("backends") or ()),
            llama_cpp=llama,
            root=str(data.get("root") or "/"),
        )


def gib(n: int | float | None) -> str:
    """Bytes as '7.6 GiB' (or '512 MiB' below 1 GiB); '?' when unknown."""
    if n is None:
        return "?"
    if abs(n) < GIB:
        return f"{n / MIB:.0f} MiB"
    return f"{n / GIB:.1f} GiB"
