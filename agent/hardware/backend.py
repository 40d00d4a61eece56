"""The probe backends' base class and registry.

Each backend (CPU, NVIDIA, AMD, Intel GPU, NPUs, llama.cpp) is a subclass in its own module that
registers itself by being defined (``__init_subclass__``, the way mkosi's distributions do); the
modules are imported only when a probe runs. A backend owns its detection and turns every missing
driver or library into a BackendFact instead of an exception.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .report import BackendFact, Cpu, Gpu, Npu

log = logging.getLogger(__name__)

MODULES = ("cpu", "nvidia", "amd", "intel", "npu", "llama")
"""Backend modules in probe order, imported lazily by ``load_backends``."""


@dataclass
class ProbeContext:
    """What a backend probes: a root directory (``/`` or a fixture tree) and seams for libraries."""

    root: Path = Path("/")
    nvml: Any = None
    """An NVML source (hearth.hardware.nvml); None means the real one for ``/`` or ``<root>/nvml.json``."""
    llama_devices: Callable[[], Any] | None = None
    """Returns llama.cpp's devices; None means hearth.llamacpp.devices() for ``/``, ``<root>/llamacpp.json`` else."""
    with_llama: bool = True

    def path(self, absolute: str) -> Path:
        """An absolute path on the probed machine, under the root."""
        return self.root / absolute.lstrip("/")

    @property
    def is_live(self) -> bool:
        """True when probing this machine rather than a fixture tree."""
        return self.root.resolve() == Path("/")


@dataclass
class Findings:
    """What one backend adds to the report."""

    fact: BackendFact
    cpu: Cpu | None = None
    memory: int | None = None
    memory_available: int | None = None
    gpus: list[Gpu] = field(default_factory=list)
    npus: list[Npu] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Backend:
    """One kind of hardware and how to find it; subclasses set ``name`` and implement ``probe``."""

    name: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[Backend]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            Backend.registry[cls.name] = cls

    def __init__(self, ctx: ProbeContext) -> None:
        self.ctx = ctx

    def probe(self, found: dict[str, Findings]) -> Findings:
        """Look for this backend's devices; *found* holds what earlier backends saw (by backend name)."""
        raise NotImplementedError

    def fact(self, available: bool, reason: str | None = None, devices: int = 0) -> BackendFact:
        """A BackendFact for this backend."""
        return BackendFact(self.name, available, reason, devices)


def load_backends() -> list[type[Backend]]:
    """Import every backend module (each registers itself) and return the classes in probe order."""
    for module in MODULES:
        importlib.import_module(f"{__package__}.{module}")
    order = {m: i for i, m in enumerate(MODULES)}
    return sorted(Backend.registry.values(), key=lambda cls: order.get(cls.__module__.rpartition(".")[2], 99))
