"""The one way Hearth gets llama-cpp-python: ``load()`` imports it and registers ggml's backends once.

Hearth's wheel is built with ``GGML_BACKEND_DL=ON`` and every x86-64 CPU variant: the CPU (and any GPU)
backends are separate shared libraries that ggml picks at run time, and no model loads until they are
registered. Registration must go through ``libggml.so.0`` (the file libllama links against by its soname);
the wheel also ships a byte-identical ``libggml.so`` copy, and registering through that one fills a
second, unused registry. Everything else in Hearth calls ``load()`` instead of ``import llama_cpp``.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import HearthError

log = logging.getLogger(__name__)

_lock = threading.Lock()
_module: ModuleType | None = None
_ggml: ctypes.CDLL | None = None

DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}
"""ggml's ``enum ggml_backend_dev_type`` as words."""


class RuntimeMissing(HearthError):
    """llama-cpp-python is not installed or its libraries cannot be loaded."""


def lib_dir() -> Path:
    """The folder holding the wheel's shared libraries (``llama_cpp/lib``)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeMissing("llama-cpp-python is not installed",
                             hint="install Hearth's llama-cpp-python wheel into the agent's environment")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _ggml_lib(directory: Path) -> ctypes.CDLL:
    # Prefer the soname file: it is the one libllama.so already has open, so dlopen returns the same
    # handle and the same backend registry. Fall back to libggml.so for builds without the soname link.
    for name in ("libggml.so.0", "libggml.so"):
        path = directory / name
        if path.exists():
            lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            _declare(lib)
            return lib
    raise RuntimeMissing(f"no libggml in {directory}", hint="reinstall Hearth's llama-cpp-python wheel")


def _declare(lib: ctypes.CDLL) -> None:
    vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    lib.ggml_backend_load_all_from_path.argtypes = [cp]
    lib.ggml_backend_load_all_from_path.restype = None
    lib.ggml_backend_dev_count.argtypes = []
    lib.ggml_backend_dev_count.restype = sz
    lib.ggml_backend_dev_get.argtypes = [sz]
    lib.ggml_backend_dev_get.restype = vp
    for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, fn).argtypes = [vp]
        getattr(lib, fn).restype = cp
    lib.ggml_backend_dev_type.argtypes = [vp]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_memory.argtypes = [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]
    lib.ggml_backend_dev_memory.restype = None
    lib.ggml_backend_load.argtypes = [cp]
    lib.ggml_backend_load.restype = vp
    lib.ggml_backend_reg_count.argtypes = []
    lib.ggml_backend_reg_count.restype = sz


def backend_dir(directory: Path | None = None) -> Path | None:
    """Where the wheel keeps ggml's backend libraries (``libggml-cpu-*.so``...), or None when the
    backends are built into libggml (no ``GGML_BACKEND_DL``).

    scikit-build installs CMake MODULE libraries to the install prefix's ``bin/``, which for a wheel is
    ``site-packages/bin``; other builds put them next to libggml. ``$HEARTH_GGML_BACKEND_DIR`` wins.
    """
    directory = directory or lib_dir()
    override = os.environ.get("HEARTH_GGML_BACKEND_DIR")
    candidates = [Path(override)] if override else []
    candidates += [directory, directory.parent / "bin", directory.parent.parent / "bin"]
    for candidate in candidates:
        if any(p for p in candidate.glob("libggml-*.so") if not p.name.startswith("libggml-base")):
            return candidate
    return None


SKIPPED_VARIANTS = frozenset({"sapphirerapids"})
"""CPU variants ggml must not pick on its own. The AMX variant (sapphirerapids) is chosen on any CPU whose
cpuid lists AMX, but its kernels execute ``tilezero`` on compute threads that never loaded a tile
configuration and die with SIGILL (seen on a Xeon VM where AMX itself works). The AVX-512 variants
below it are safe; ``$HEARTH_GGML_CPU_VARIANT`` can still force it."""


def _load_all_but(ggml: ctypes.CDLL, backends: Path, skipped: frozenset[str]) -> None:
    """ggml_backend_load_all_from_path over a view of *backends* without the *skipped* CPU variants.

    ggml scores every ``libggml-cpu-*.so`` in the folder and loads the best; a temporary folder of
    symlinks hides the skipped ones. The links can go once loaded (dlopen holds the files).
    """
    libs = [p for p in backends.glob("libggml-*.so") if not p.name.startswith("libggml-base")]
    hidden = [p for p in libs if p.name.removeprefix("libggml-cpu-").removesuffix(".so") in skipped
              and p.name.startswith("libggml-cpu-")]
    if not hidden:
        ggml.ggml_backend_load_all_from_path(str(backends).encode())
        return
    with tempfile.TemporaryDirectory(prefix="hearth-ggml-") as view:
        for p in libs:
            if p not in hidden:
                os.symlink(p, Path(view) / p.name)
        ggml.ggml_backend_load_all_from_path(view.encode())


def cpu_variants(directory: Path | None = None) -> list[str]:
    """The CPU variants the wheel ships (x64, sse42, haswell, skylakex, ...)."""
    found = backend_dir() if directory is None else directory
    return sorted(p.name[len("libggml-cpu-"):-3] for p in found.glob("libggml-cpu-*.so")) if found else []


def load() -> ModuleType:
    """The ``llama_cpp`` module, with ggml's dynamic backends registered exactly once per process."""
    global _module, _ggml
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        directory = lib_dir()
        try:
            import llama_cpp
        except (ImportError, OSError) as e:
            raise RuntimeMissing(f"cannot load llama-cpp-python: {e}",
                                 hint="reinstall Hearth's llama-cpp-python wheel") from None
        ggml = _ggml_lib(directory)
        backends = backend_dir(directory)
        variant = os.environ.get("HEARTH_GGML_CPU_VARIANT", "")
        if backends is not None and ggml.ggml_backend_dev_count() == 0 and variant:
            # A forced CPU variant (benchmarks, or a CPU whose flags promise more than it runs).
            path = backends / f"libggml-cpu-{variant}.so"
            if not path.exists():
                raise RuntimeMissing(f"no CPU variant '{variant}' in {backends}",
                                     hint="variants: " + ", ".join(sorted(cpu_variants(backends))))
            ggml.ggml_backend_load(str(path).encode())
        elif backends is not None and ggml.ggml_backend_dev_count() == 0:
            _load_all_but(ggml, backends, SKIPPED_VARIANTS)
            if ggml.ggml_backend_dev_count() == 0:
                raise RuntimeMissing(f"no ggml backend in {backends} runs on this CPU",
                                     hint="the wheel needs at least its x64 CPU variant")
            log.debug("registered %d ggml backends from %s", ggml.ggml_backend_reg_count(), backends)
        _ggml = ggml
        _module = llama_cpp
        return llama_cpp


def devices() -> list[dict[str, Any]]:
    """What llama.cpp can compute on: one dict per ggml device (name, description, type, memory)."""
    load()
    assert _ggml is not None
    out = []
    for i in range(_ggml.ggml_backend_dev_count()):
        dev = _ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        _ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append({
            "name": (_ggml.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
            "description": (_ggml.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
            "type": DEVICE_TYPES.get(_ggml.ggml_backend_dev_type(dev), "unknown"),
            "memory_free": free.value,
            "memory_total": total.value,
        })
    return out


_VARIANT = re.compile(r"libggml-cpu-([A-Za-z0-9_]+)\.so")


def cpu_variant() -> str | None:
    """Which CPU variant ggml chose (e.g. 'haswell'), from the libraries mapped into this process."""
    load()
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = _VARIANT.search(maps)
    return found.group(1) if found else None


def system_info() -> str:
    """llama.cpp's one-line summary of the CPU features it uses."""
    return bytes(load().llama_print_system_info()).decode(errors="replace").strip()
