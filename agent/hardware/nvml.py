"""The seam between the NVIDIA backend and NVML: the real library (nvidia-ml-py) or recorded values.

An NVML source answers ``read()`` with a plain dict (the format of ``ci/record-nvml`` and of the
fixtures' ``nvml.json``)::

    {"driver_version": "550.54.14", "cuda_driver_version": 12040,
     "devices": [{"index": 0, "name": "NVIDIA GeForce RTX 3060", "uuid": "GPU-...",
                  "memory_total": 12884901888, "memory_free": 12465471488,
                  "compute_capability": "8.6", "pci_bus_id": "00000000:01:00.0"}]}

or raises NvmlUnavailable with the reason in words.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REASONS = {
    "NVMLError_LibraryNotFound": "NVML library not found (no NVIDIA driver installed)",
    "NVMLError_DriverNotLoaded": "NVIDIA driver not loaded (kernel module missing or failed)",
    "NVMLError_NoPermission": "no permission to talk to the NVIDIA driver (/dev/nvidia*)",
    "NVMLError_InsufficientPower": "the GPU's power cables are not connected",
    "NVMLError_GpuIsLost": "the GPU fell off the bus (check power and seating)",
}


class NvmlUnavailable(Exception):
    """NVML cannot be used here; the message says why in words."""


def reason_for(error: BaseException) -> str:
    """Words for an NVML exception."""
    return REASONS.get(type(error).__name__, f"NVML error: {error}")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class PynvmlSource:
    """The real NVML through nvidia-ml-py (``pynvml``); used when probing this machine."""

    def read(self) -> dict[str, Any]:
        """Query every device; raises NvmlUnavailable when NVML or the driver is absent."""
        try:
            import pynvml
        except ImportError as e:
            raise NvmlUnavailable("nvidia-ml-py is not installed") from e
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise NvmlUnavailable(reason_for(e)) from e
        try:
            out: dict[str, Any] = {"driver_version": _text(pynvml.nvmlSystemGetDriverVersion()), "devices": []}
            try:
                out["cuda_driver_version"] = int(pynvml.nvmlSystemGetCudaDriverVersion_v2())
            except (pynvml.NVMLError, AttributeError):
                out["cuda_driver_version"] = None
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                try:
                    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                    cc: str | None = f"{major}.{minor}"
                except pynvml.NVMLError:
                    cc = None
                out["devices"].append({
                    "index": i,
                    "name": _text(pynvml.nvmlDeviceGetName(handle)),
                    "uuid": _text(pynvml.nvmlDeviceGetUUID(handle)),
                    "memory_total": int(mem.total),
                    "memory_free": int(mem.free),
                    "compute_capability": cc,
                    "pci_bus_id": _text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
                })
            return out
        except pynvml.NVMLError as e:
            raise NvmlUnavailable(reason_for(e)) from e
        finally:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass


class RecordedSource:
    """Recorded NVML answers (a dict, or a JSON file from ci/record-nvml); ``{"error": name}`` replays a failure."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    @classmethod
    def from_file(cls, path: Path) -> RecordedSource:
        """Load a recording."""
        return cls(json.loads(path.read_text(encoding="utf-8")))

    def read(self) -> dict[str, Any]:
        """The recorded answers, or the recorded error."""
        if "error" in self.data:
            name = str(self.data["error"])
            raise NvmlUnavailable(REASONS.get(name, f"NVML error: {self.data.get('message', name)}"))
        return self.data
