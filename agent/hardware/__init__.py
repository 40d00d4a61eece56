"""Hardware detection: every CPU, GPU and NPU in the PC, and what llama.cpp can use.

``probe()`` runs each registered backend (see backend.py) against a root directory and merges what
they found into one ``Report``. A missing driver or library is a fact in the report, never a crash.
"""

from __future__ import annotations

import dataclasses
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
    gpus = tuple(g for f in found.values() for g in f.gpus)
    return Report(
        cpu=cpu,
        memory=memory,
        memory_available=available,
        gpus=through_llama(gpus, llama),
        npus=tuple(n for f in found.values() for n in f.npus),
        backends=tuple(f.fact for f in found.values()),
        llama_cpp=llama or LlamaCpp(False, "not probed"),
        root=str(root),
    )


_VENDOR_WORDS = {"nvidia": ("nvidia", "geforce", "rtx", "quadro"), "amd": ("amd", "radeon"), "intel": ("intel", "arc")}


def through_llama(gpus: tuple[Gpu, ...], llama: LlamaCpp | None) -> tuple[Gpu, ...]:
    """GPUs that the vendor probe could not vouch for (no NVML without NVIDIA's driver, say) but that llama.cpp
    computes on (Vulkan through Mesa's NVK, RADV or ANV) become usable, with the memory llama.cpp reports."""
    if llama is None or not llama.available:
        return gpus
    offered = [d for d in llama.devices if d.get("type") in ("gpu", "igpu") and d.get("memory_total")]
    out = []
    for g in gpus:
        words = _VENDOR_WORDS.get(g.vendor, (g.vendor,))
        match = next((d for d in offered if any(w in str(d.get("description", "")).lower() for w in words)), None)
        if match is not None and not g.integrated and (not g.usable or not g.vram_total):
            offered.remove(match)
            g = dataclasses.replace(
                g, usable=True, vram_total=g.vram_total or int(match["memory_total"]),
                vram_free=int(match["memory_free"]) if match.get("memory_free") else g.vram_free,
                note=f"used through llama.cpp's {match['name']} ({match.get('description', '')})"
                     + (f"; {g.note}" if g.note else ""))
        elif match is not None:
            offered.remove(match)
        out.append(g)
    return tuple(out)
