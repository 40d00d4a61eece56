"""The one way Hearth gets llama.cpp: ``load()`` imports llama-cpp-python over Hearth's runtime and registers
ggml's backends once; ``runtime_dir()`` says where the runtime's servers are.

Hearth's runtime (built by ``ci/runtime``) is one llama.cpp tree compiled into shared ``libllama`` + ggml,
every x86-64 CPU variant and the Vulkan and RPC backends as separate libraries that ggml loads at run time
(``GGML_BACKEND_DL``), and llama.cpp's own ``llama-server`` and ``rpc-server`` linked against the same
libraries. Its folder holds ``bin/`` (servers and backends) and ``lib/`` (libllama, libggml); llama-cpp-python
is installed without libraries of its own and pointed at ``lib/`` here, so the agent's in-process calls and
the servers see the same devices and the same version.

The CPU variant is ggml's own pick: the runtime's ggml asks the OS as well as CPUID (image/runtime/patches),
so a variant whose register state the kernel does not enable (AVX-512, AMX tiles) is never chosen.
llama.cpp's chatter ("load_backend: ...") goes to this module's logger at debug level, never to a
``hearth`` command's output; its warnings and errors are logged as such.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
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

DEFAULT_RUNTIME = Path("/usr/lib/hearth/runtime")
"""Where the image keeps the runtime."""


class RuntimeMissing(HearthError):
    """Hearth's llama.cpp runtime (or llama-cpp-python) is not installed or cannot be loaded."""


def runtime_dir() -> Path:
    """The runtime's folder: ``$HEARTH_RUNTIME``, else ``<venv>/runtime``, else /usr/lib/hearth/runtime."""
    override = os.environ.get("HEARTH_RUNTIME")
    candidates = [Path(override)] if override else [Path(sys.prefix) / "runtime", DEFAULT_RUNTIME]
    for candidate in candidates:
        if (candidate / "lib").is_dir():
            return candidate
    raise RuntimeMissing(f"no llama.cpp runtime in {' or '.join(map(str, candidates))}",
                         hint="build it with ci/runtime and set HEARTH_RUNTIME, or reinstall the image")


def lib_dir() -> Path:
    """The folder holding libllama and libggml (``<runtime>/lib``)."""
    return runtime_dir() / "lib"


def backend_dir(runtime: Path | None = None) -> Path:
    """The folder holding ggml's backend libraries (``libggml-cpu-*.so``, ``libggml-vulkan.so``...)."""
    return (runtime or runtime_dir()) / "bin"


def server_binary(name: str = "llama-server") -> Path:
    """One of the runtime's programs (llama-server, rpc-server, llama-bench), checked to exist."""
    path = backend_dir() / name
    if not os.access(path, os.X_OK):
        raise RuntimeMissing(f"{path} is missing", hint="rebuild the runtime with ci/runtime")
    return path


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
    lib.ggml_backend_reg_get.argtypes = [sz]
    lib.ggml_backend_reg_get.restype = vp
    lib.ggml_backend_reg_name.argtypes = [vp]
    lib.ggml_backend_reg_name.restype = cp


# --- llama.cpp's log -------------------------------------------------------------------------------

LogListener = Callable[[int, str], None]

_listeners: list[LogListener] = []
_log_cb: Any = None

_GGML_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
"""ggml_log_level -> logging level. INFO (2) is chatter (backend loads, tensor sizes): debug here."""


def add_log_listener(listener: LogListener) -> None:
    """Call *listener(level, line)* for every line llama.cpp logs from now on (the engine reads its offload line)."""
    _listeners.append(listener)


def _route_log(llama_cpp: Any) -> None:
    """Send llama.cpp's and ggml's log to Python logging, once per process, before any backend loads."""
    global _log_cb
    if _log_cb is not None:
        return
    last = [logging.DEBUG]
    llama_log = logging.getLogger("hearth.llamacpp.native")

    def callback(level: int, text: bytes | None, user_data: Any) -> None:
        line = (text or b"").decode(errors="replace")
        if level != 5:  # GGML_LOG_LEVEL_CONT continues the previous line at its level
            last[0] = _GGML_LEVELS.get(level, logging.DEBUG)
        for listener in list(_listeners):
            listener(level, line)
        if line.strip():
            llama_log.log(last[0], "%s", line.rstrip())

    # Never freed: llama.cpp calls it for the life of the process (also while freeing models).
    _log_cb = llama_cpp.llama_log_callback(callback)
    llama_cpp.llama_log_set(_log_cb, ctypes.c_void_p(0))


def load() -> ModuleType:
    """The ``llama_cpp`` module over Hearth's runtime, with ggml's backends registered exactly once."""
    global _module, _ggml
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        runtime = runtime_dir()
        libs = runtime / "lib"
        # llama-cpp-python reads these when first imported: its libllama and libmtmd are the runtime's.
        os.environ["LLAMA_CPP_LIB_PATH"] = str(libs)
        os.environ["MTMD_CPP_LIB"] = str(libs)
        try:
            import llama_cpp
        except (ImportError, OSError, RuntimeError) as e:
            raise RuntimeMissing(f"cannot load llama-cpp-python over {libs}: {e}",
                                 hint="rebuild the runtime with ci/runtime and reinstall its llama-cpp-python") from None
        _route_log(llama_cpp)
        # The soname file is the one libllama already has open: the same handle, the same registry.
        ggml = ctypes.CDLL(str(libs / "libggml.so.0"), mode=ctypes.RTLD_GLOBAL)
        _declare(ggml)
        backends = backend_dir(runtime)
        variant = os.environ.get("HEARTH_GGML_CPU_VARIANT", "")
        if ggml.ggml_backend_reg_count() == 0:
            if variant:
                # A forced CPU variant (benchmarks comparing variants), then every other backend.
                path = backends / f"libggml-cpu-{variant}.so"
                if not path.exists():
                    raise RuntimeMissing(f"no CPU variant '{variant}' in {backends}",
                                         hint="variants: " + ", ".join(cpu_variants(backends)))
                ggml.ggml_backend_load(str(path).encode())
                for other in sorted(backends.glob("libggml-*.so")):
                    if not other.name.startswith("libggml-cpu-"):
                        ggml.ggml_backend_load(str(other).encode())
            else:
                ggml.ggml_backend_load_all_from_path(str(backends).encode())
            if ggml.ggml_backend_dev_count() == 0:
                raise RuntimeMissing(f"no ggml backend in {backends} runs on this CPU",
                                     hint="the runtime needs at least its x64 CPU variant")
            log.debug("registered ggml backends %s from %s", ", ".join(backend_names(ggml)), backends)
        _ggml = ggml
        _module = llama_cpp
        return llama_cpp


def backend_names(ggml: ctypes.CDLL | None = None) -> list[str]:
    """The registered ggml backends (CPU, Vulkan, RPC...)."""
    lib = ggml or _ggml
    if lib is None:
        load()
        lib = _ggml
    assert lib is not None
    return [(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)) or b"").decode()
            for i in range(lib.ggml_backend_reg_count())]


def cpu_variants(directory: Path | None = None) -> list[str]:
    """The CPU variants the runtime ships (x64, sse42, haswell, skylakex, ...)."""
    found = backend_dir() if directory is None else directory
    return sorted(p.name[len("libggml-cpu-"):-3] for p in found.glob("libggml-cpu-*.so"))


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


def facts_in_subprocess(timeout: float = 60.0) -> dict[str, Any]:
    """{"devices": devices(), "cpu_variant": cpu_variant()}, asked in a child process: GPU runtimes stay out
    of the agent, and a driver that crashes while probing takes only the child down."""
    code = ("import json; from hearth import llamacpp; "
            "print(json.dumps({'devices': llamacpp.devices(), 'cpu_variant': llamacpp.cpu_variant()}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if run.returncode != 0:
        lines = (run.stderr.strip() or f"exit status {run.returncode}").splitlines()
        raise RuntimeMissing(lines[-1])
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))
