"""The llama.cpp backend: which devices the runtime in this image can really use (hearth.llamacpp.devices())."""

from __future__ import annotations

import importlib
import json
from typing import Any

from ..errors import HearthError
from .backend import Backend, Findings
from .report import LlamaCpp

GPU_TYPES = ("gpu", "igpu")


def _get(dev: Any, *names: str) -> Any:
    for name in names:
        value = dev.get(name) if isinstance(dev, dict) else getattr(dev, name, None)
        if value is not None:
            return value
    return None


def normalize(dev: Any) -> dict[str, Any]:
    """One llama.cpp device (a dict or an object) as {name, type, description, memory_free, memory_total}."""
    kind = _get(dev, "type", "kind")
    kind = getattr(kind, "name", kind)
    kind = str(kind).lower().rpartition("_")[2] if kind is not None else "unknown"
    return {
        "name": str(_get(dev, "name") or "?"),
        "type": kind,
        "description": str(_get(dev, "description", "desc") or ""),
        "memory_free": _get(dev, "memory_free", "free"),
        "memory_total": _get(dev, "memory_total", "total"),
    }


def summarize(devices: list[Any], cpu_variant: str | None = None) -> LlamaCpp:
    """A LlamaCpp fact from the runtime's device list."""
    devs = tuple(normalize(d) for d in devices)
    return LlamaCpp(available=True, reason=None, gpu_offload=any(d["type"] in GPU_TYPES for d in devs), devices=devs,
                    cpu_variant=cpu_variant)


def no_gpu_reason(backends: list[str]) -> str:
    """Why llama.cpp offers no GPU, in the words a user can act on."""
    if "Vulkan" in backends:
        return ("llama.cpp sees no GPU it can use (CPU only): its Vulkan backend found no GPU driver "
                "(Mesa's RADV/ANV/NVK or a vendor's)")
    return "llama.cpp sees no GPU it can use (CPU only)"


class LlamaBackend(Backend):
    """llama.cpp's own view of usable backends and devices."""

    name = "llama.cpp"

    def probe(self, found: dict[str, Findings]) -> Findings:
        """Ask the runtime; a missing runtime is a fact."""
        if not self.ctx.with_llama:
            return self._none("not probed (--no-llama)")
        variant = None
        backends: list[str] = []
        try:
            if self.ctx.llama_devices is not None:
                devices = list(self.ctx.llama_devices())
            elif self.ctx.is_live:
                runtime = importlib.import_module("hearth.llamacpp")
                devices = list(runtime.devices())
                variant = runtime.cpu_variant()
                backends = runtime.backend_names()
            else:
                recorded = self.ctx.path("/llamacpp.json")
                if not recorded.exists():
                    return self._none("not probed (fixture root without llamacpp.json)")
                devices = json.loads(recorded.read_text(encoding="utf-8"))
        except ImportError as e:
            return self._none(f"llama.cpp runtime not installed ({e.name or e})")
        except HearthError as e:  # hearth.llamacpp's RuntimeMissing: the wheel is absent or broken
            return self._none(e.message)
        except Exception as e:  # the runtime's own loader failing is a fact about this image
            return self._none(f"llama.cpp could not list devices: {e}")
        llama = summarize(devices, variant)
        gpus = [d["name"] for d in llama.devices if d["type"] in GPU_TYPES]
        reason = None if gpus else no_gpu_reason(backends)
        return Findings(self.fact(True, reason, devices=len(llama.devices)), extra={"llama_cpp": llama})

    def _none(self, reason: str) -> Findings:
        return Findings(self.fact(False, reason), extra={"llama_cpp": LlamaCpp(False, reason)})
