"""Selection: hardware x catalogue, table-driven; overrides, forced choices that cannot fit, nothing fits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hearth import config as config_mod
from hearth.hardware import GIB, Report, probe
from hearth.select import (
    ModelSpec,
    ModelTooBig,
    NothingFits,
    UnknownModel,
    estimate,
    load_catalogue,
    load_profiles,
    select,
)

MACHINES = Path(__file__).resolve().parents[1] / "fixtures" / "machines"
CATALOGUE = load_catalogue()
PROFILES = load_profiles()


def machine(name: str, **kw: object) -> Report:
    return probe(MACHINES / name, **kw)  # type: ignore[arg-type]


def cfg(**model: object) -> config_mod.Config:
    return config_mod.from_dict({"model": model})


def with_memory(report: Report, total_gib: float, available_gib: float) -> Report:
    return dataclasses.replace(report, memory=int(total_gib * GIB), memory_available=int(available_gib * GIB))


# What a careful person would run on each fixture machine, and why.
CAREFUL_PICKS = [
    # 12 GB RTX 3060: a 14B Q4_K_M with 8k context fills it with ~1.4 GiB to spare.
    ("desktop-nvidia", "qwen2.5-14b-instruct", "gpu", 8192, "gpu-12gb"),
    # Two 12 GB cards hold a 32B between them (one alone could not).
    ("two-gpus", "qwen2.5-32b-instruct", "gpu", 8192, "gpu-24gb"),
    # 24 GB RX 7900 XTX; the CPU's own Raphael iGPU is not counted as VRAM.
    ("desktop-amd", "qwen2.5-32b-instruct", "gpu", 8192, "gpu-24gb"),
    # 32 GB laptops with a capable iGPU: a 7B in shared memory is quick enough to chat with.
    ("laptop-meteorlake", "qwen2.5-7b-instruct", "unified", 8192, "apu"),
    ("amd-apu-strix", "qwen2.5-7b-instruct", "unified", 8192, "apu"),
    # N100 with 16 GB: 4 slow cores; a 4B is the largest that answers at reading speed.
    ("minipc-n100", "gemma3-4b", "cpu", 8192, "cpu"),
]


@pytest.mark.parametrize(("name", "model", "device", "context", "klass"), CAREFUL_PICKS)
def test_each_machine_gets_the_careful_pick(name: str, model: str, device: str, context: int, klass: str) -> None:
    choice = select(machine(name), catalogue=CATALOGUE, profiles=PROFILES)
    assert choice is not None
    assert (choice.model.name, choice.device, choice.context, choice.hardware_class) == (model, device, context, klass)
    assert choice.estimate.total <= choice.free
    assert choice.gpu_layers == (0 if device == "cpu" else -1)
    assert choice.threads == machine(name).cpu.cores
    assert choice.reason.startswith(choice.model.label + ": needs ") and f"{context // 1024}k context" in choice.reason


def test_reason_names_the_gpu() -> None:
    choice = select(machine("desktop-nvidia"), catalogue=CATALOGUE, profiles=PROFILES)
    assert choice is not None
    assert choice.reason == ("Qwen2.5 14B Instruct Q4_K_M: needs 10.2 GiB with 8k context; one request at a time "
                             "(memory holds one slot); this node has 11.6 GiB free VRAM on NVIDIA GeForce RTX 3060")
    assert choice.slots == 1


def test_slots_fill_the_memory_the_model_leaves() -> None:
    """The profile allows 4 slots; a small model on a big GPU gets all 4, each with the full context."""
    r = machine("desktop-nvidia")
    choice = select(r, catalogue=CATALOGUE, profiles=PROFILES, config=cfg(name="qwen2.5-1.5b-instruct"))
    assert choice is not None and choice.slots == 4
    assert "4 requests at once (4 slots of" in choice.reason
    assert choice.estimate.kv_cache == estimate(choice.model, choice.context * 4).kv_cache


def test_one_gpu_of_two_would_get_less() -> None:
    r = machine("two-gpus")
    one = dataclasses.replace(r, gpus=r.gpus[:1])
    choice = select(one, catalogue=CATALOGUE, profiles=PROFILES)
    assert choice is not None and choice.model.name == "qwen2.5-14b-instruct"


# Memory (total, available GiB) x the model a CPU-only box gets.
@pytest.mark.parametrize(("total", "available", "cores", "expected", "context"), [
    (3.7, 2.5, 4, "qwen2.5-1.5b-instruct", 4096),     # a 4 GB thin client
    (3.7, 2.0, 4, "qwen2.5-0.5b-instruct", 4096),     # ... with little free
    (7.6, 6.0, 4, "gemma3-4b", 8192),                 # 8 GB office PC
    (31.0, 28.0, 8, "qwen2.5-7b-instruct", 8192),     # 32 GB desktop
    (23.5, 22.0, 2, "qwen2.5-1.5b-instruct", 4096),   # a 2-core VM: few cores decide, not memory
])
def test_cpu_only_table(total: float, available: float, cores: int, expected: str, context: int) -> None:
    base = machine("minipc-n100")
    r = dataclasses.replace(with_memory(base, total, available), cpu=dataclasses.replace(base.cpu, cores=cores))
    choice = select(r, catalogue=CATALOGUE, profiles=PROFILES)
    assert choice is not None and (choice.model.name, choice.context) == (expected, context)


def test_context_shrinks_before_the_model_does() -> None:
    r = machine("desktop-nvidia")
    gpu = dataclasses.replace(r.gpus[0], vram_free=int(10.9 * GIB))
    choice = select(dataclasses.replace(r, gpus=(gpu,)), catalogue=CATALOGUE, profiles=PROFILES)
    assert choice is not None and (choice.model.name, choice.context) == ("qwen2.5-14b-instruct", 4096)


def test_nothing_fits() -> None:
    r = with_memory(machine("minipc-n100"), 1.0, 0.6)
    with pytest.raises(NothingFits) as e:
        select(r, catalogue=CATALOGUE, profiles=PROFILES)
    assert "the smallest, Gemma 3 270M" in e.value.message and "614 MiB free RAM" in e.value.message
    assert e.value.hint


def test_forced_model_too_big() -> None:
    with pytest.raises(ModelTooBig) as e:
        select(machine("minipc-n100"), catalogue=CATALOGUE, config=cfg(name="qwen2.5-32b-instruct"), profiles=PROFILES)
    assert e.value.message.startswith("Qwen2.5 32B Instruct Q4_K_M does not fit: it needs")
    assert "13.8 GiB free RAM" in e.value.message
    assert e.value.hint and "Qwen2.5 14B Instruct Q4_K_M" in e.value.hint


def test_forced_model_that_fits_and_overrides() -> None:
    choice = select(machine("desktop-nvidia"), catalogue=CATALOGUE, config=cfg(name="llama3.1-8b-instruct", context=16384,
                    threads=3), profiles=PROFILES)
    assert choice is not None
    assert (choice.model.name, choice.context, choice.threads, choice.device) == ("llama3.1-8b-instruct", 16384, 3, "gpu")


def test_forced_too_big_for_vram_runs_split() -> None:
    choice = select(machine("desktop-nvidia"), catalogue=CATALOGUE, config=cfg(name="qwen2.5-32b-instruct"), profiles=PROFILES)
    assert choice is not None and choice.device == "gpu+cpu"
    assert 0 < choice.gpu_layers < choice.model.n_layers and "layers" in choice.reason


def test_gpu_layers_zero_means_cpu() -> None:
    choice = select(machine("desktop-nvidia"), catalogue=CATALOGUE, config=cfg(gpu_layers=0), profiles=PROFILES)
    assert choice is not None and choice.device == "cpu" and choice.gpu_layers == 0
    assert choice.hardware_class == "cpu-large" and "free RAM" in choice.reason


def test_forced_context_too_big() -> None:
    with pytest.raises(ModelTooBig, match="with 128k context"):
        select(machine("minipc-n100"), catalogue=CATALOGUE, config=cfg(name="gemma3-4b", context=131072), profiles=PROFILES)


def test_unknown_model_and_none() -> None:
    with pytest.raises(UnknownModel) as e:
        select(machine("minipc-n100"), catalogue=CATALOGUE, config=cfg(name="gemma3-4"), profiles=PROFILES)
    assert e.value.hint and "gemma3-4b" in e.value.hint
    assert select(machine("minipc-n100"), catalogue=CATALOGUE, config=cfg(name="none"), profiles=PROFILES) is None


def test_cpu_only_llama_build_plans_for_ram() -> None:
    r = machine("desktop-nvidia", llama_devices=lambda: [{"name": "CPU", "type": "cpu"}])
    choice = select(r, catalogue=CATALOGUE, profiles=PROFILES)
    assert choice is not None and choice.device == "cpu" and choice.gpu_layers == 0
    assert "sees no GPU" in choice.reason


def test_estimate_matches_the_formula() -> None:
    gemma = next(m for m in CATALOGUE if m.name == "gemma3-4b")
    est = estimate(gemma, 8192)
    assert est.kv_cache == 2 * 34 * 8192 * 4 * 256 * 2
    assert est.weights == gemma.size_bytes and est.margin == GIB
    assert 256 << 20 < est.overhead < 1 << 30
    assert est.total == est.weights + est.kv_cache + est.overhead + est.margin


def test_downloaded_gguf_facts_replace_the_catalogue(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(3)
    w.add_context_length(2048)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_tensor("t", np.zeros(16, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    spec = ModelSpec.from_entry({"name": "tiny", "display_name": "Tiny", "size_bytes": 10**9, "n_layers": 99,
                                 "n_kv_heads": 9, "head_dim": 128, "context_length": 4096, "file": "tiny.gguf"})
    choice = select(machine("minipc-n100"), catalogue=[spec], config=cfg(name="tiny"), profiles=PROFILES, models_dir=tmp_path)
    assert choice is not None
    assert choice.model.n_layers == 3 and choice.model.n_kv_heads == 2 and choice.model.key_length == 16
    assert choice.model.size_bytes == path.stat().st_size and choice.context == 2048


def test_every_profile_model_is_in_the_catalogue() -> None:
    names = {m.name for m in CATALOGUE}
    for cls in PROFILES.classes:
        assert set(cls.models) <= names, cls.name
    assert PROFILES.classes[-1].when == {}  # the last class catches every machine


def test_strix_halo_is_a_large_apu() -> None:
    r = with_memory(machine("amd-apu-strix"), 125.0, 118.0)
    halo = dataclasses.replace(r.gpus[0], pci_id="1002:1586", name="AMD Radeon 8060S (Strix Halo)")
    r = dataclasses.replace(r, gpus=(halo,), cpu=dataclasses.replace(r.cpu, cores=16))
    choice = select(r, catalogue=CATALOGUE, profiles=PROFILES)
    assert choice is not None
    assert (choice.hardware_class, choice.model.name, choice.device, choice.context) == \
        ("apu-large", "qwen2.5-32b-instruct", "unified", 16384)


def test_weak_igpu_does_not_make_an_apu_machine() -> None:
    r = with_memory(machine("minipc-n100"), 31.0, 28.0)  # N100 UHD iGPU, 32 GB
    r = dataclasses.replace(r, cpu=dataclasses.replace(r.cpu, cores=8))
    choice = select(r, catalogue=CATALOGUE, profiles=PROFILES)
    assert choice is not None and (choice.hardware_class, choice.device) == ("cpu-large", "cpu")
