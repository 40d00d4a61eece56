"""Verified offload: after a model loads, say loudly when a usable GPU sits idle while the CPU does the work."""

from __future__ import annotations

from typing import Any

from .report import Gpu, Report

BACKEND_OF = {"nvidia": ("CUDA", "nvidia"), "amd": ("ROCm or Vulkan", "amd"), "intel": ("SYCL or Vulkan", "intel")}
"""GPU vendor -> the llama.cpp backend it needs and the image profile that has it."""


def _get(facts: Any, *names: str) -> Any:
    for name in names:
        value = facts.get(name) if isinstance(facts, dict) else getattr(facts, name, None)
        if value is not None:
            return value
    return None


def offload_warning(report: Report, facts: Any) -> str | None:
    """A loud one-line warning when a discrete GPU exists but the loaded model runs (partly) on the CPU.

    *facts* are the offload facts llama-server reports when the model loads (hearth.serving.llamaserver: a
    dict with ``layers_offloaded``, ``layers_total``, ``gpu_offload_supported`` and llama.cpp's
    ``devices``; a ``backend`` name is honoured too); None (no model loaded) gives None.
    """
    if facts is None:
        return None
    gpus = [g for g in report.gpus if not g.integrated]
    if not gpus:
        return None
    usable = [g for g in gpus if g.usable]
    offloaded = _get(facts, "layers_offloaded", "offloaded", "n_gpu_layers_used", "gpu_layers")
    total = _get(facts, "layers_total", "total", "n_layers")
    backend = str(_get(facts, "backend") or "").lower()
    on_cpu = offloaded == 0 or backend in ("cpu", "") and offloaded in (None, 0)
    if not usable:
        g = gpus[0]
        return f"WARNING: {_name(g)} found but the model runs on the CPU: {g.note or 'its driver is not working'}"
    g = usable[0]
    wants, profile = BACKEND_OF.get(g.vendor, ("GPU", g.vendor))
    supported = _get(facts, "gpu_offload_supported")
    devices = _get(facts, "devices")
    if isinstance(devices, list) and devices and supported is None:
        supported = any(str(_get(d, "type") or "").lower() in ("gpu", "igpu") for d in devices)
    if report.llama_cpp.gpu_offload is False or supported is False:
        return (f"WARNING: {_name(g)} found but llama.cpp in this image has no {wants} backend, so the model "
                f"runs on the CPU: build the image with the {profile} profile")
    if on_cpu:
        return (f"WARNING: {_name(g)} found but the model runs on the CPU (0 of {total or '?'} layers offloaded): "
                f"set model.gpu_layers to -1, or pick a model that fits in {g.name}'s memory")
    if isinstance(offloaded, int) and isinstance(total, int) and 0 < offloaded < total:
        return (f"WARNING: only {offloaded} of {total} layers run on the {_name(g)}; the rest run on the CPU "
                f"(slow): pick a smaller model or a shorter context")
    return None


def _name(g: Gpu) -> str:
    return g.name
