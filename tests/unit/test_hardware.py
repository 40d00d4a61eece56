"""The hardware probe against fixture machines (real sysfs/procfs layouts), NVML's two paths, and this machine."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from hearth.hardware import GIB, Report, probe
from hearth.hardware.amd import gfx_name
from hearth.hardware.backend import Backend, load_backends
from hearth.hardware.llama import no_gpu_reason
from hearth.hardware.nvml import NvmlUnavailable, PynvmlSource, RecordedSource
from hearth.hardware.offload import offload_warning

MACHINES = Path(__file__).resolve().parents[1] / "fixtures" / "machines"


def machine(name: str, **kw: object) -> Report:
    return probe(MACHINES / name, **kw)  # type: ignore[arg-type]


def fact(report: Report, backend: str):
    return next(b for b in report.backends if b.backend == backend)


def test_backends_register_themselves() -> None:
    names = [cls.name for cls in load_backends()]
    assert names == ["cpu", "nvidia", "amd", "intel", "npu", "llama.cpp"]
    assert set(Backend.registry) >= set(names)


def test_desktop_nvidia() -> None:
    r = machine("desktop-nvidia")
    assert (r.cpu.model, r.cpu.cores, r.cpu.threads) == ("AMD Ryzen 5 5600X 6-Core Processor", 6, 12)
    assert "avx2" in r.cpu.flags and "avx512f" not in r.cpu.flags
    assert r.memory == 32795412 * 1024 and r.memory_available == 29814220 * 1024
    (gpu,) = r.gpus  # the card's HDMI audio function (class 0x0403) is not a GPU
    assert gpu.name == "NVIDIA GeForce RTX 3060" and gpu.pci_address == "0000:01:00.0"
    assert gpu.pci_id == "10de:2504" and gpu.compute_capability == "8.6" and gpu.driver_version == "550.120"
    assert gpu.vram_total == 12 * GIB and gpu.usable and not gpu.integrated
    assert gpu.uuid and gpu.uuid.startswith("GPU-")
    assert fact(r, "nvidia").available and fact(r, "nvidia").devices == 1
    assert r.npus == ()


def test_two_gpus_are_both_seen() -> None:
    r = machine("two-gpus")
    assert [g.pci_address for g in r.gpus] == ["0000:01:00.0", "0000:0a:00.0"]
    assert all(g.usable for g in r.gpus) and len(r.usable_gpus) == 2
    assert (r.cpu.cores, r.cpu.threads) == (12, 24)


def test_laptop_meteorlake_igpu_and_npu() -> None:
    r = machine("laptop-meteorlake")
    assert (r.cpu.cores, r.cpu.threads) == (16, 22)  # 6 P-cores with HT, 8 E-cores, 2 LP E-cores
    (gpu,) = r.gpus
    assert gpu.vendor == "intel" and gpu.integrated and gpu.driver == "i915" and gpu.pci_id == "8086:7d55"
    assert "Meteor Lake" in gpu.name and r.usable_gpus == ()
    (npu,) = r.npus
    assert npu.name.startswith("Intel NPU") and npu.driver == "intel_vpu" and npu.usable
    assert npu.state == "suspended" and npu.firmware == "/lib/firmware/intel/vpu/vpu_37xx_v0.0.bin"


def test_amd_apu_with_xdna() -> None:
    r = machine("amd-apu-strix")
    (gpu,) = r.gpus
    assert gpu.vendor == "amd" and gpu.integrated and gpu.gfx_target == "gfx1150"
    assert gpu.vram_total == 2 * GIB and gpu.vram_free == 2 * GIB - 318767104
    (npu,) = r.npus
    assert npu.name.startswith("AMD XDNA") and npu.driver == "amdxdna" and npu.pci_id == "1022:17f0"
    assert npu.firmware == "/lib/firmware/amdnpu/17f0_10/npu.sbin"
    assert "avx512_vnni" in r.cpu.flags


def test_desktop_amd_tells_igpu_from_dgpu() -> None:
    r = machine("desktop-amd")
    dgpu, igpu = r.gpus
    assert not dgpu.integrated and dgpu.gfx_target == "gfx1100" and dgpu.vram_total == 25753026560
    assert igpu.integrated and igpu.gfx_target == "gfx1036"
    assert r.usable_gpus == (dgpu,)


def test_minipc_n100() -> None:
    r = machine("minipc-n100")
    assert (r.cpu.model, r.cpu.cores, r.cpu.threads) == ("Intel(R) N100", 4, 4)
    assert "avx512f" not in r.cpu.flags and "avx2" in r.cpu.flags
    assert r.gpus[0].integrated and r.npus == () and r.usable_gpus == ()


def test_gfx_names() -> None:
    assert [gfx_name(v) for v in (90012, 100306, 110000, 110003, 110501)] == \
        ["gfx90c", "gfx1036", "gfx1100", "gfx1103", "gfx1151"]


def test_nvidia_gpu_without_driver_is_a_fact(tmp_path: Path) -> None:
    root = tmp_path / "m"
    shutil.copytree(MACHINES / "desktop-nvidia", root, symlinks=True)
    (root / "sys/devices/pci0000:00/0000:00:01.1/0000:01:00.0/driver").unlink()
    r = probe(root)
    (gpu,) = r.gpus
    assert not gpu.usable and gpu.driver is None
    assert "NVIDIA GPU present but driver not loaded" in (gpu.note or "")
    nv = fact(r, "nvidia")
    assert not nv.available and "driver not loaded" in (nv.reason or "")


def test_nvml_absent_here_is_a_fact() -> None:
    """The real nvidia-ml-py on this machine: nvmlInit raises NVMLError_LibraryNotFound."""
    pytest.importorskip("pynvml")
    if any(Path("/proc/driver/nvidia").glob("*")):
        pytest.skip("this machine has an NVIDIA driver")
    with pytest.raises(NvmlUnavailable, match="NVML library not found"):
        PynvmlSource().read()
    nv = fact(probe("/", with_llama=False), "nvidia")
    assert nv == type(nv)("nvidia", False, "NVML library not found (no NVIDIA driver installed)", 0)


def test_recorded_nvml_error_replays() -> None:
    r = machine("desktop-nvidia", nvml=RecordedSource({"error": "NVMLError_DriverNotLoaded"}))
    assert not fact(r, "nvidia").available
    assert "NVIDIA driver not loaded" in (r.gpus[0].note or "")


def _fake_pynvml(recorded: dict) -> types.ModuleType:
    """A stand-in for the nvidia-ml-py module answering with recorded values, the way pynvml answers."""
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    devs = recorded["devices"]
    m.NVMLError = NVMLError  # type: ignore[attr-defined]
    m.nvmlInit = lambda: None  # type: ignore[attr-defined]
    m.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    m.nvmlSystemGetDriverVersion = lambda: recorded["driver_version"]  # type: ignore[attr-defined]
    m.nvmlSystemGetCudaDriverVersion_v2 = lambda: recorded["cuda_driver_version"]  # type: ignore[attr-defined]
    m.nvmlDeviceGetCount = lambda: len(devs)  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    m.nvmlDeviceGetName = lambda h: devs[h]["name"].encode()  # type: ignore[attr-defined]  # old versions: bytes
    m.nvmlDeviceGetUUID = lambda h: devs[h]["uuid"]  # type: ignore[attr-defined]
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        total=devs[h]["memory_total"], free=devs[h]["memory_free"], used=devs[h]["memory_total"] - devs[h]["memory_free"])
    m.nvmlDeviceGetCudaComputeCapability = lambda h: tuple(int(x) for x in devs[h]["compute_capability"].split("."))  # type: ignore[attr-defined]
    m.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=devs[h]["pci_bus_id"].encode())  # type: ignore[attr-defined]
    return m


def test_pynvml_boundary_with_recorded_values(monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = json.loads((MACHINES / "two-gpus/nvml.json").read_text())
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(recorded))
    data = PynvmlSource().read()
    assert data["devices"] == recorded["devices"]
    assert data["driver_version"] == "550.120" and data["cuda_driver_version"] == 12040
    r = machine("two-gpus", nvml=PynvmlSource())
    assert [g.vram_free for g in r.gpus] == [d["memory_free"] for d in recorded["devices"]]


def test_report_json_round_trip() -> None:
    for name in sorted(os.listdir(MACHINES)):
        r = machine(name)
        data = json.loads(json.dumps(r.to_dict()))
        assert Report.from_dict(data) == r
        assert {"cpu", "memory", "gpus", "npus", "backends"} <= set(data)


def test_llama_devices_decide_offload() -> None:
    cpu_only = [{"name": "CPU", "type": "cpu", "description": "Intel N100", "memory_free": 1, "memory_total": 2}]
    r = machine("desktop-nvidia", llama_devices=lambda: cpu_only)
    assert r.llama_cpp.available and r.llama_cpp.gpu_offload is False
    assert "sees no GPU" in (fact(r, "llama.cpp").reason or "")
    cuda = cpu_only + [{"name": "CUDA0", "type": "gpu", "description": "NVIDIA GeForce RTX 3060",
                        "memory_free": 12455510016, "memory_total": 12884901888}]
    assert machine("desktop-nvidia", llama_devices=lambda: cuda).llama_cpp.gpu_offload is True


def test_llama_failure_is_a_fact() -> None:
    def broken() -> list:
        raise OSError("libggml.so.0: cannot open shared object file")

    r = machine("minipc-n100", llama_devices=broken)
    assert not r.llama_cpp.available and "cannot open shared object" in (r.llama_cpp.reason or "")


def test_offload_warning() -> None:
    r = machine("desktop-nvidia")
    assert offload_warning(r, None) is None
    assert offload_warning(r, {"backend": "CUDA0", "layers_offloaded": 49, "layers_total": 49}) is None
    cpu_build = machine("desktop-nvidia", llama_devices=lambda: [{"name": "CPU", "type": "cpu"}])
    w = offload_warning(cpu_build, {"backend": "CPU", "layers_offloaded": 0, "layers_total": 49})
    assert w and "NVIDIA GeForce RTX 3060 found" in w and "no CUDA backend" in w and "nvidia profile" in w
    w = offload_warning(r, {"backend": "CPU", "layers_offloaded": 0, "layers_total": 49})
    assert w and "0 of 49 layers" in w
    w = offload_warning(r, {"backend": "CUDA0", "layers_offloaded": 20, "layers_total": 49})
    assert w and "only 20 of 49" in w
    # The engine's own record of a load in the CPU-only image (hearth.serving.engine's offload dict).
    engine_facts = {"devices": [{"name": "CPU", "type": "cpu"}], "cpu_variant": "haswell",
                    "gpu_offload_supported": False, "layers_offloaded": 0, "layers_total": 49}
    w = offload_warning(r, engine_facts)
    assert w and "no CUDA backend" in w
    # No discrete GPU: running on the CPU is expected, no warning.
    assert offload_warning(machine("minipc-n100"), {"backend": "CPU", "layers_offloaded": 0, "layers_total": 34}) is None


def test_this_machine_tells_the_truth() -> None:
    """`hearth hardware --json` on this machine: threads as the OS counts them, cores as /proc says."""
    run = subprocess.run([sys.executable, "-m", "hearth", "hardware", "--json", "--no-llama"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    cpuinfo = Path("/proc/cpuinfo").read_text()
    threads = sum(1 for line in cpuinfo.splitlines() if line.startswith("processor"))
    cores = set()
    for block in cpuinfo.split("\n\n"):
        fields = dict(line.replace("\t", "").split(":", 1) for line in block.splitlines() if ":" in line)
        if "processor" in fields:
            cores.add((fields.get("physical id"), fields.get("core id")))
    assert data["cpu"]["threads"] == threads == os.cpu_count()
    assert data["cpu"]["cores"] == len(cores)
    total_kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
    assert data["memory"] == total_kb * 1024
    if not Path("/sys/class/drm").exists() and not Path("/proc/driver/nvidia").exists():
        assert data["gpus"] == [] and data["npus"] == []


def test_cli_table_on_a_fixture(capsys: pytest.CaptureFixture[str]) -> None:
    from hearth.cli import main

    assert main(["hardware", "--root", str(MACHINES / "laptop-meteorlake")]) == 0
    out = capsys.readouterr().out
    assert "Intel NPU (Meteor Lake)" in out and "16 cores, 22 threads" in out and "Model: Qwen2.5 7B" in out


def test_api_router_serves_the_report() -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from hearth.hardware.api import router

    app = FastAPI()
    app.include_router(router)
    data = TestClient(app).get("/hearth/v1/hardware").json()
    assert data["cpu"]["threads"] == os.cpu_count() and isinstance(data["gpus"], list)


def _copy(tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    shutil.copytree(MACHINES / name, root, symlinks=True)
    return root


def test_npu_without_its_driver(tmp_path: Path) -> None:
    root = _copy(tmp_path, "laptop-meteorlake")
    (root / "sys/devices/pci0000:00/0000:00:0b.0/driver").unlink()
    shutil.rmtree(root / "sys/class/accel")  # no driver, no accel node
    (npu,) = probe(root, with_llama=False).npus
    assert not npu.usable and npu.driver is None
    assert npu.note == "Intel NPU (Meteor Lake) present but the intel_vpu driver is not loaded"


def test_amd_gpu_without_amdgpu(tmp_path: Path) -> None:
    root = _copy(tmp_path, "desktop-amd")
    (root / "sys/devices/pci0000:00/0000:00:01.1/0000:03:00.0/driver").unlink()
    r = probe(root, with_llama=False)
    dgpu = r.gpus[0]
    assert not dgpu.usable and "amdgpu driver is not loaded" in (dgpu.note or "")
    assert r.usable_gpus == ()
    # With the dGPU unusable the igpu (512 MiB carve-out) must not turn this into a GPU class.
    from hearth.select import select

    choice = select(r)
    assert choice is not None and (choice.device, choice.hardware_class) == ("cpu", "cpu-large")


def test_broken_backend_is_a_fact_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    from hearth.hardware.intel import IntelBackend

    def boom(self: object, found: object) -> object:
        raise RuntimeError("sysfs changed under us")

    monkeypatch.setattr(IntelBackend, "probe", boom)
    r = machine("minipc-n100")
    assert fact(r, "intel").reason == "probe failed: sysfs changed under us"
    assert r.cpu.cores == 4  # the other backends still report


def test_cli_bad_root(capsys: pytest.CaptureFixture[str]) -> None:
    from hearth.cli import main

    assert main(["hardware", "--root", "/no/such/machine"]) == 2
    assert "hearth: error: --root /no/such/machine: no such directory" in capsys.readouterr().err


def test_llama_cpp_here_has_vulkan_but_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine has no GPU: the runtime loads its Vulkan backend, ggml skips CPU-type Vulkan devices
    (lavapipe) unless told otherwise, so the report says CPU only and why."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    monkeypatch.delenv("GGML_VK_VISIBLE_DEVICES", raising=False)
    r = probe("/")
    assert r.llama_cpp.available, r.llama_cpp.reason
    assert r.llama_cpp.gpu_offload is False
    assert any(d["type"] == "cpu" for d in r.llama_cpp.devices)
    assert fact(r, "llama.cpp").reason == no_gpu_reason(["CPU", "Vulkan", "RPC"])


def test_a_gpu_without_its_vendor_driver_is_used_through_llama_cpp() -> None:
    """An NVIDIA card on the default image (nouveau + Mesa's NVK, no NVML) is still a GPU to plan for, with
    the memory llama.cpp's Vulkan device reports; the CPU-only view leaves it unusable."""
    from hearth.hardware import Gpu, LlamaCpp, through_llama

    card = Gpu(vendor="nvidia", name="NVIDIA GeForce RTX 3060", integrated=False, vram_total=None, usable=False,
               note="NVIDIA GPU present but driver not loaded")
    vulkan = LlamaCpp(available=True, gpu_offload=True, devices=(
        {"name": "CPU", "type": "cpu", "description": "AMD Ryzen 5 5600X", "memory_free": 1, "memory_total": 2},
        {"name": "Vulkan0", "type": "gpu", "description": "NVIDIA GeForce RTX 3060 (NVK GA106)",
         "memory_free": 12 * GIB, "memory_total": 12 * GIB}))
    (used,) = through_llama((card,), vulkan)
    assert used.usable and used.vram_total == 12 * GIB and used.vram_free == 12 * GIB
    assert used.note and "Vulkan0" in used.note and "driver not loaded" in used.note
    cpu_only = LlamaCpp(available=True, gpu_offload=False, devices=vulkan.devices[:1])
    assert through_llama((card,), cpu_only) == (card,)
    assert through_llama((card,), None) == (card,)


def test_cli_verify_gpu_says_in_words_what_the_comparison_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from hearth.cli import main
    from hearth.hardware import verify

    store = tmp_path / "models"
    store.mkdir()
    (store / "big.gguf").write_bytes(b"G" * 300)
    (store / "small.gguf").write_bytes(b"G" * 100)
    config = tmp_path / "hearth.yaml"
    config.write_text(f"state:\n  dir: {tmp_path}\n")
    asked: list[Path] = []
    verdicts = iter([
        verify.Verdict(positions=32, matched=31, near_ties=1, gpu_device="Vulkan0 (AMD Radeon RX 6700 XT (RADV NAVI22))",
                       layers_offloaded=29, layers_total=29, gpu_backends=["Vulkan"]),
        verify.Verdict(positions=32, matched=30, near_ties=0, gpu_device="Vulkan0 (X)", layers_offloaded=29,
                       layers_total=29, mismatches=[{"pos": 9, "cpu": 17, "gpu": 4, "cpu_gap": 0.5},
                                                    {"pos": 20, "cpu": 3, "gpu": 8, "cpu_gap": 1.25}]),
        verify.Verdict(positions=32, matched=32, near_ties=0, layers_offloaded=0, layers_total=29),
    ])

    def fake(model: Path, **kw: object) -> verify.Verdict:
        asked.append(Path(model))
        return next(verdicts)

    monkeypatch.setattr(verify, "verify", fake)
    # No model named: the store's smallest (the quickest check).
    assert main(["--config", str(config), "hardware", "--verify-gpu"]) == 0
    out = capsys.readouterr().out
    assert asked == [store / "small.gguf"]
    assert "31 of 32 tokens as the CPU's (1 near-ties), 29/29 layers on Vulkan0 (AMD Radeon" in out and "ok: " in out
    assert main(["--config", str(config), "hardware", "--verify-gpu", str(store / "big.gguf")]) == 1
    out = capsys.readouterr().out
    assert "position 9: the GPU chose token 4, the CPU 17" in out and "position 20" in out
    # Nothing on the GPU is a failure too, however well the tokens matched.
    assert main(["--config", str(config), "hardware", "--verify-gpu", "--json"]) == 1
    assert '"ok": false' in capsys.readouterr().out
    # Bad input: one line that says what to do.
    assert main(["--config", str(config), "hardware", "--verify-gpu", str(tmp_path / "nope.gguf")]) == 2
    assert "no such file" in capsys.readouterr().err
    for f in store.iterdir():
        f.unlink()
    assert main(["--config", str(config), "hardware", "--verify-gpu"]) == 2
    assert "has no model to check with" in capsys.readouterr().err
