"""``hearth hardware``: what this node has (CPU, memory, GPUs, NPUs), what llama.cpp can use, and the pick."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_json_flag, load_config, print_json, print_table


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``hardware`` subcommand."""
    p = sub.add_parser("hardware", help="show the CPU, memory, GPUs and NPUs found and the model that fits")
    p.add_argument("--root", metavar="DIR", default="/",
                   help="probe a saved or fake machine tree instead of this machine (tests, support)")
    p.add_argument("--no-llama", action="store_true", help="do not ask llama.cpp for its devices")
    p.add_argument("--verify-gpu", nargs="?", const="", metavar="MODEL",
                   help="check that the GPU computes what the CPU computes: every layer of MODEL (default: the "
                        "smallest model in the store) on the GPU, 32 tokens compared with the CPU's (minutes)")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Probe and print."""
    import os

    from ..errors import HearthError, UsageError
    from ..hardware import probe
    from ..select import select

    if args.verify_gpu is not None:
        return verify_gpu(args)
    if not os.path.isdir(args.root):
        raise UsageError(f"--root {args.root}: no such directory", hint="give a machine tree such as tests/fixtures/machines/minipc-n100")
    report = probe(args.root, with_llama=not args.no_llama)
    choice: Any = None
    problem = None
    try:
        choice = select(report, config=load_config(args))
    except HearthError as e:
        problem = e.message + (f" ({e.hint})" if e.hint else "")
    except ImportError as e:  # the model catalogue is not installed: the report still stands
        problem = f"cannot pick a model: {e}"
    if args.json:
        data = report.to_dict()
        data["choice"] = choice.to_dict() if choice else None
        if problem:
            data["choice_problem"] = problem
        print_json(data)
        return 0
    print_report(report)
    print()
    if choice:
        print(f"Model: {choice.reason}")
        print(f"       class {choice.hardware_class}, {choice.device}, context {choice.context}, "
              f"gpu_layers {choice.gpu_layers}, threads {choice.threads}")
    elif problem:
        print(f"Model: {problem}")
    return 0


def verify_gpu(args: argparse.Namespace) -> int:
    """``hearth hardware --verify-gpu [MODEL]``: hearth.hardware.verify on the GPU llama.cpp would use; exit 0
    when every layer ran there and its tokens are the CPU's, 1 when not."""
    from pathlib import Path

    from ..errors import UsageError
    from ..hardware import verify

    if args.verify_gpu:
        model = Path(args.verify_gpu)
        if not model.is_file():
            raise UsageError(f"--verify-gpu {model}: no such file", hint="give a GGUF model file, or none for the store's")
    else:
        from ..models.store import Store

        store = Store.from_config(load_config(args))
        found = sorted(store.list(), key=lambda m: m.size)
        if not found:
            raise UsageError(f"--verify-gpu: the model store ({store.root}) has no model to check with",
                             hint="name a GGUF file: hearth hardware --verify-gpu MODEL.gguf")
        model = found[0].path
    verdict = verify.verify(model)
    if args.json:
        print_json({**verdict.__dict__, "ok": verdict.ok, "model": str(model)})
        return 0 if verdict.ok else 1
    where = verdict.gpu_device or "no GPU"
    print(f"GPU check on {model.name}: {verdict.matched} of {verdict.positions} tokens as the CPU's"
          f"{f' ({verdict.near_ties} near-ties)' if verdict.near_ties else ''}, "
          f"{verdict.layers_offloaded}/{verdict.layers_total} layers on {where}")
    if verdict.ok:
        print("ok: the GPU computes what the CPU computes")
        return 0
    if verdict.layers_total == 0 or verdict.layers_offloaded < verdict.layers_total:
        print("not ok: llama.cpp did not put every layer on a GPU (see 'hearth hardware' for what it found)")
    for m in verdict.mismatches[:5]:
        print(f"not ok: position {m['pos']}: the GPU chose token {m['gpu']}, the CPU {m['cpu']} "
              f"(the CPU's two best were {m['cpu_gap']:.3f} apart)")
    return 1


def print_report(report: Any) -> None:
    """The report as a table of devices, what needs attention, then what each backend concluded."""
    from ..hardware import gib

    cpu = report.cpu
    rows: list[tuple[str, ...]] = [
        ("cpu", cpu.model, f"{cpu.cores} cores, {cpu.threads} threads", _vector_units(cpu.flags)),
        ("memory", "RAM", f"{gib(report.memory)} total", f"{gib(report.memory_available)} available"),
    ]
    notes: list[str] = []
    for g in report.gpus:
        kind = "igpu" if g.integrated else "gpu"
        if g.integrated:
            memory = f"shares RAM ({gib(g.vram_total)} carve-out)" if g.vram_total else "shares RAM"
        else:
            memory = f"{gib(g.vram_free)} free of {gib(g.vram_total)}" if g.vram_total else "memory unknown"
        details = [g.pci_address, g.pci_id, f"driver {g.driver or 'none'}"]
        details += [x for x in (g.driver_version, g.compute_capability and f"cc {g.compute_capability}",
                                g.gfx_target) if x]
        rows.append((kind, g.name, memory, " ".join(d for d in details if d)))
        if g.note:
            notes.append(f"{g.name}: {g.note}")
    for n in report.npus:
        details = [n.pci_address, n.pci_id, f"driver {n.driver or 'none'}", n.state or ""]
        rows.append(("npu", n.name, "driver loaded" if n.usable else "not usable", " ".join(d for d in details if d)))
        if n.firmware:
            notes.append(f"{n.name}: firmware {n.firmware}; llama.cpp does not run models on NPUs")
        if n.note:
            notes.append(f"{n.name}: {n.note}")
    llama = report.llama_cpp
    if llama.available:
        devs = ", ".join(f"{d['name']} ({d['type']})" for d in llama.devices) or "none"
        if llama.cpu_variant:
            devs += f"; CPU variant {llama.cpu_variant}"
        rows.append(("llama.cpp", "GPU offload" if llama.gpu_offload else "CPU only", "", devs))
    else:
        rows.append(("llama.cpp", "not available", "", llama.reason or ""))
    print_table(("kind", "device", "memory", "details"), rows)
    for note in notes:
        print(f"! {note}")
    print()
    print_table(("backend", "found", "reason"),
                [(b.backend, f"{b.devices} device{'s' if b.devices != 1 else ''}" if b.available else "no",
                  b.reason or "") for b in report.backends])


def _vector_units(flags: tuple[str, ...]) -> str:
    """The CPU's vector extensions in the words people use (the JSON has the raw flags)."""
    have = set(flags)
    names = [label for flag, label in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX512-VNNI"),
                                       ("avx_vnni", "AVX-VNNI"), ("amx_tile", "AMX"), ("asimd", "NEON"), ("sve", "SVE"))
             if flag in have]
    return " ".join(names) or ("AVX" if "avx" in have else "no AVX (slowest llama.cpp variant)")
