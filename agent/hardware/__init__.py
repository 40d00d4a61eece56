"""Hardware detection: every CPU, GPU and NPU in the PC, and what llama.cpp can use.

``probe()`` runs each registered backend (see backend.py) against a root directory and merges what
they found into one ``Report``. A missing driver or library is a fact in the report, never a crash.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .backend import Backend, Findings, ProbeContext, load_backends
from .report import GIB, BackendFact, Cpu, Gpu, LlamaCpp, Npu, Report, gib

__all__ = ["GIB", "BackendFact", "Cpu", "Gpu", "LlamaCpp", "Npu", "Report", "gib", "probe"]

log = logging.getLogger(__name__)


def probe(root: str | os.PathLike[str] = "/", *, nvml: Any = None, llama_devices: Any = None,
          with_llama: bool = True) -> Report:
    """Probe the machine under *root* ("/" = this one) and return what every backend found."""
    ctx = ProbeContext(Path(root), nvml=nvml, llama_devices=llama_devices, with_llama=with_llama)
    found: dict[str, Findings] = {}
    for cls in load_backends():
        backend: Backend = cls(ctx)
        try:
            found[cls.name] = backend.probe(found)
        except Exception as e:  # a backend bug must not take the report down; say what broke
            log.warning("hardware backend %s failed: %s", cls.name, e, exc_info=True)
            found[cls.name] = Findings(BackendFact(cls.name, False, f"probe failed: {e}"))
    cpu = next((f.cpu for f in found.values() if f.cpu), Cpu())
    memory = next((f.memory for f in found.values() if f.memory), 0)
    available = next((f.memory_available for f in found.values() if f.memory_available), 0)
    llama = found["llama.cpp"].extra.get("llama_cpp") if "llama.cpp" in found else None
    return Report(
        cpu=cpu,
        memory=memory,
        memory_available=available,
        gpus=tuple(g for f in found.values() for g in f.gpus),
        npus=tuple(n for f in found.values() for n in f.npus),
        backends=tuple(f.fact for f in found.values()),
        llama_cpp=llama or LlamaCpp(False, "not probed"),
        root=str(root),
    )
