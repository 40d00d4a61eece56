"""The CPU backend: model, physical cores, threads and vector flags from /proc/cpuinfo; RAM from /proc/meminfo."""

from __future__ import annotations

from .backend import Backend, Findings
from .report import Cpu
from .sysfs import read_text

INTERESTING_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni",
                     "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve", "i8mm", "dotprod")
"""Flags that decide which llama.cpp CPU variant runs (x86 and the ARM 'Features' names, NEON = asimd)."""


def parse_cpuinfo(text: str) -> Cpu:
    """A Cpu from /proc/cpuinfo text (x86 and ARM layouts)."""
    blocks = [b for b in text.split("\n\n") if b.strip()]
    threads = 0
    cores: set[tuple[str, str]] = set()
    model = vendor = ""
    flags: set[str] = set()
    arch = "x86_64"
    for block in blocks:
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "processor" not in fields or not fields["processor"].isdigit():
            model = model or fields.get("Hardware", "") or fields.get("Model", "")
            continue
        threads += 1
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
        model = model or fields.get("model name", "")
        vendor = vendor or fields.get("vendor_id", "") or fields.get("CPU implementer", "")
        if "Features" in fields:
            arch = "aarch64"
        flags |= set((fields.get("flags") or fields.get("Features") or "").split())
    return Cpu(
        model=model or "unknown",
        vendor=vendor or "unknown",
        arch=arch,
        cores=len(cores) or threads or 1,
        threads=threads or 1,
        flags=tuple(f for f in INTERESTING_FLAGS if f in flags),
    )


def parse_meminfo(text: str) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo text (values are in kB)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    total = values.get("MemTotal", 0)
    # Kernels before 3.14 lack MemAvailable; free + page cache is the old estimate.
    available = values.get("MemAvailable", values.get("MemFree", 0) + values.get("Cached", 0))
    return total, available


class CpuBackend(Backend):
    """Processor and system memory."""

    name = "cpu"

    def probe(self, found: dict[str, Findings]) -> Findings:
        """Read /proc/cpuinfo and /proc/meminfo under the root."""
        cpuinfo = read_text(self.ctx.path("/proc/cpuinfo"))
        meminfo = read_text(self.ctx.path("/proc/meminfo"))
        if cpuinfo is None:
            return Findings(self.fact(False, f"cannot read {self.ctx.path('/proc/cpuinfo')}"))
        cpu = parse_cpuinfo(cpuinfo)
        total, available = parse_meminfo(meminfo or "")
        reason = None if meminfo is not None else "cannot read /proc/meminfo"
        return Findings(self.fact(True, reason, devices=1), cpu=cpu, memory=total, memory_available=available)
