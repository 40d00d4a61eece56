"""What this node offers the household pool: RAM and VRAM per device, after its own model and a reserve.

The node's own model comes first: the offer is what is left once the own model's estimate
(hearth.select) and ``pool.reserve_mib`` are taken away, capped by ``pool.max_ram_mib`` /
``pool.max_vram_mib``. rpc-server enforces the RAM figure (rpcserver.py sets RLIMIT_DATA) and runs at a
lower CPU priority, so pool work never starves the node's own requests.

Speed is measured, not guessed: generating a token streams every weight once, so a member's share of
layers should follow its memory bandwidth (the memory-bound term of prima.cpp's Halda scheduler).
``measure_bandwidth`` times a large copy once at start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import Config

log = logging.getLogger(__name__)

MIB = 1 << 20
VRAM_BANDWIDTH_FACTOR = 4.0
"""A GPU's memory is not timed here (that would need the GPU runtime in the agent): it counts as this many
times the node's RAM bandwidth, a low figure for discrete GPUs (5-20x dual-channel DDR4)."""


@dataclass(frozen=True)
class Device:
    """One device a node offers: llama.cpp's device name (CPU, Vulkan0, CUDA0), bytes offered, speed."""

    name: str
    kind: str
    """'ram' or 'vram'."""
    bytes: int
    bandwidth_gbs: float
    """Measured (RAM) or derived (VRAM) memory bandwidth, GB/s: the weight of this device's share."""


@dataclass(frozen=True)
class Offer:
    """What one node offers the pool, as published in its mesh state under ``pool``."""

    node: str
    name: str
    devices: tuple[Device, ...] = ()
    rpc_ready: bool = False
    """Its rpc-server is up (a pool can use it now)."""
    serving: tuple[str, ...] = field(default=())
    """Pooled models this node heads: serving, forming, or waiting for members (a peer leaves them to it)."""
    members: tuple[str, ...] = field(default=())
    """The nodes (ids) its pools hold now, forming or serving: each one's rpc-server serves that pool only."""

    @property
    def total(self) -> int:
        """Bytes offered over every device."""
        return sum(d.bytes for d in self.devices)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the mesh state."""
        return {"node": self.node, "name": self.name, "devices": [asdict(d) for d in self.devices],
                "rpc_ready": self.rpc_ready, "serving": list(self.serving), "members": list(self.members)}

    @classmethod
    def from_dict(cls, data: Any) -> Offer | None:
        """A peer's published offer, or None when it is missing or malformed (never an exception)."""
        if not isinstance(data, dict):
            return None
        try:
            devices = tuple(Device(str(d["name"]), str(d.get("kind", "ram")), max(0, int(d["bytes"])),
                                   max(0.0, float(d.get("bandwidth_gbs") or 0.0)))
                            for d in data.get("devices") or ())
            return cls(str(data["node"]), str(data.get("name") or data["node"]), devices,
                       bool(data.get("rpc_ready")), tuple(str(s) for s in data.get("serving") or ()),
                       tuple(str(m) for m in data.get("members") or ()))
        except (KeyError, TypeError, ValueError):
            return None


def measure_bandwidth(size: int = 64 * MIB, rounds: int = 4) -> float:
    """Memory bandwidth in GB/s from timing a copy of *size* bytes (best of *rounds*: read + write)."""
    import numpy as np

    src = np.ones(size, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return round(2 * size / max(best, 1e-9) / 1e9, 2)


def offer_devices(config: Config, report: Any, own_need: int = 0, own_device: str = "cpu",
                  bandwidth_gbs: float = 0.0) -> tuple[Device, ...]:
    """The devices this node offers, given its hardware *report* and what its own model needs.

    *own_need* (bytes, hearth.select's estimate with its margin) is taken from RAM when *own_device* is
    'cpu' or 'unified', else from the GPUs' VRAM. Nothing is offered when ``pool.enabled`` is off."""
    pool = config.pool
    if not pool.enabled or report is None:
        return ()
    reserve = pool.reserve_mib * MIB
    devices: list[Device] = []
    ram = int(getattr(report, "memory_available", 0) or 0) - reserve
    if own_device in ("cpu", "unified", "gpu+cpu"):
        ram -= own_need
    if pool.max_ram_mib:
        ram = min(ram, pool.max_ram_mib * MIB)
    if ram > 0:
        devices.append(Device("CPU", "ram", ram, bandwidth_gbs))
    own_vram = own_need if own_device == "gpu" else 0
    for dev in getattr(getattr(report, "llama_cpp", None), "devices", ()) or ():
        if not isinstance(dev, dict) or dev.get("type") not in ("gpu",):
            continue
        free = int(dev.get("memory_free") or dev.get("free") or 0)
        left = free - reserve - own_vram
        own_vram = 0  # the own model counts once, against the first GPU
        if pool.max_vram_mib:
            left = min(left, pool.max_vram_mib * MIB)
        if left > 0:
            devices.append(Device(str(dev.get("name")), "vram", left, round(bandwidth_gbs * VRAM_BANDWIDTH_FACTOR, 2)))
    return tuple(devices)


def unclaimed(offers: Sequence[Offer], me: str) -> list[Offer]:
    """*offers* less those of nodes that another head's pool holds (forming or serving), each node once.

    rpc-server serves one client at a time, so a node that is a member of someone else's pool has nothing
    left to give another: counting its offer again would count its memory twice. Pools headed by *me*
    (this node) do not count against it: they are what it plans."""
    taken = {m for o in offers if o.node != me for m in o.members}
    seen: dict[str, Offer] = {}
    for o in offers:
        if o.node not in taken and o.node not in seen:
            seen[o.node] = o
    return list(seen.values())
