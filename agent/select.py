"""Pick the model this node serves: classify the hardware, estimate memory, take the best model that fits.

The estimate (what llama.cpp will allocate) is

    weights (the GGUF file's size, or the catalogue's before download)
  + KV cache: 2 (K and V) x layers x context x KV heads x head size x 2 bytes (f16)
  + runtime overhead: compute buffers, a few hundred MiB growing with the context

and the node keeps a margin free on top (llama.cpp and GPUStack keep about 1 GiB). The KV figure
ignores sliding-window layers (Gemma 3), so it errs on the safe side.
"""

from __future__ import annotations

import difflib
import importlib.resources
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import HearthError
from .hardware.report import GIB, MIB, Gpu, Report, gib

log = logging.getLogger(__name__)

OVERHEAD_BASE = 256 * MIB
"""Compute buffers and runtime state that do not depend on the context."""
OVERHEAD_PER_TOKEN = 16 * 1024
"""Compute buffers grow with the context (attention scratch for one batch against every cached token)."""
KV_BYTES = 2
"""Bytes per cached K or V element (llama.cpp's default f16 cache)."""


class ModelTooBig(HearthError):
    """A model named in the config cannot fit in this node's memory."""


class NothingFits(HearthError):
    """No model in the catalogue fits in this node's memory."""


class UnknownModel(HearthError):
    """The config names a model that is neither in the catalogue nor in the store."""


# --- models -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """What selection needs to know about a model, from a catalogue entry or a GGUF file's metadata."""

    name: str
    display_name: str
    size_bytes: int
    n_layers: int
    n_kv_heads: int
    key_length: int
    value_length: int
    context_length: int
    quantization: str = ""
    parameters: float = 0.0
    file: str = ""
    entry: Any = field(default=None, compare=False, repr=False)
    """The catalogue entry this came from (None for a file found only in the store)."""

    @property
    def label(self) -> str:
        """'Gemma 3 4B Q4_K_M'."""
        if self.quantization and self.quantization.lower() not in self.display_name.lower():
            return f"{self.display_name} {self.quantization}"
        return self.display_name

    @classmethod
    def from_entry(cls, entry: Any) -> ModelSpec:
        """From a catalogue entry (hearth.models.catalogue) or any object/dict with its field names."""

        def get(*names: str, default: Any = None) -> Any:
            for n in names:
                value = entry.get(n) if isinstance(entry, dict) else getattr(entry, n, None)
                if value is not None:
                    return value
            return default

        embedding = int(get("embedding_length", default=0) or 0)
        heads = int(get("n_heads", "head_count", default=0) or 0)
        head_dim = int(get("head_dim", "key_length", default=0) or 0) or (embedding // heads if heads else 128)
        name = str(get("name"))
        return cls(
            name=name,
            display_name=str(get("display_name", "display", default=name)),
            size_bytes=int(get("size_bytes", "size", default=0)),
            n_layers=int(get("n_layers", "block_count", default=1)),
            n_kv_heads=int(get("n_kv_heads", "head_count_kv", default=1)),
            key_length=head_dim,
            value_length=int(get("value_length", default=head_dim)),
            context_length=int(get("context_length", default=8192)),
            quantization=str(get("quantization", default="")),
            parameters=_billions(get("parameters_b", "parameters", default=0)),
            file=str(get("file", default="")),
            entry=entry,
        )

    def with_facts(self, facts: Any) -> ModelSpec:
        """This model with the numbers a downloaded GGUF really has (hearth.models.gguf.model_facts)."""
        heads = facts.head_count or 1
        key = facts.key_length or ((facts.embedding_length or 0) // heads) or self.key_length
        return replace(
            self,
            size_bytes=facts.file_size or self.size_bytes,
            n_layers=facts.n_layers or self.n_layers,
            n_kv_heads=facts.head_count_kv or facts.head_count or self.n_kv_heads,
            key_length=key,
            value_length=facts.value_length or key,
            context_length=facts.context_length or self.context_length,
            quantization=facts.quantization or self.quantization,
        )


def _billions(value: Any) -> float:
    """'4B', '270M', 4.0 or 4_000_000_000 -> billions of parameters."""
    if isinstance(value, int | float):
        return float(value) / 1e9 if value > 10_000 else float(value)
    text = str(value).strip().upper()
    try:
        if text.endswith("B"):
            return float(text[:-1])
        if text.endswith("M"):
            return float(text[:-1]) / 1000
        return float(text or 0)
    except ValueError:
        return 0.0


def load_catalogue() -> list[ModelSpec]:
    """Every model in the catalogue (hearth.models.catalogue), as ModelSpecs."""
    from .models import catalogue

    return [ModelSpec.from_entry(e) for e in catalogue.load()]


# --- the estimate -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """Memory a model needs at a context size, in bytes, and the margin kept on top."""

    weights: int
    kv_cache: int
    overhead: int
    margin: int
    context: int

    @property
    def need(self) -> int:
        """What llama.cpp will allocate."""
        return self.weights + self.kv_cache + self.overhead

    @property
    def total(self) -> int:
        """What must be free: the need plus the margin."""
        return self.need + self.margin

    def to_dict(self) -> dict[str, int]:
        """Plain data for JSON."""
        return {"weights": self.weights, "kv_cache": self.kv_cache, "overhead": self.overhead,
                "margin": self.margin, "context": self.context, "need": self.need, "total": self.total}


def estimate(model: ModelSpec, context: int, margin: int = GIB) -> Estimate:
    """The memory *model* needs with *context* tokens of KV cache."""
    kv = model.n_layers * context * model.n_kv_heads * (model.key_length + model.value_length) * KV_BYTES
    return Estimate(model.size_bytes, kv, OVERHEAD_BASE + context * OVERHEAD_PER_TOKEN, margin, context)


# --- profiles ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HardwareClass:
    """One class of machine from profiles/hardware.yaml and what it gets."""

    name: str
    description: str
    when: dict[str, Any]
    context: int
    min_context: int
    offload: str
    threads: str | int
    models: tuple[str, ...]
    slots: int = 4
    """Requests generated at once at most (llama-server slots); fewer when memory is short."""

    def matches(self, vram: float, ram: float, igpus: Sequence[Gpu], cores: int) -> bool:
        """Whether a machine with these figures (GiB, GiB, usable iGPUs, cores) belongs to this class."""
        w = self.when
        return (vram >= float(w.get("vram_gib", 0)) and ram >= float(w.get("ram_gib", 0))
                and (not w.get("unified") or self.unified_gpu(igpus) is not None)
                and cores >= int(w.get("cores", 0)))

    def unified_gpu(self, igpus: Sequence[Gpu]) -> Gpu | None:
        """The integrated GPU that makes a machine this unified-memory class (``when: unified``)."""
        wanted = self.when.get("unified")
        if not wanted:
            return None
        ids = {str(i).lower() for i in wanted} if isinstance(wanted, list) else None
        return next((g for g in igpus if ids is None or g.pci_id.lower() in ids), None)

    @property
    def uses_gpu(self) -> bool:
        """True for the discrete-GPU classes."""
        return bool(self.when.get("vram_gib"))


@dataclass(frozen=True)
class Profiles:
    """The hardware classes, in match order, and the margin to keep free."""

    classes: tuple[HardwareClass, ...]
    margin: int = GIB


def load_profiles(path: str | Path | None = None) -> Profiles:
    """Read profiles/hardware.yaml (or *path*)."""
    if path is None:
        text = importlib.resources.files("hearth.profiles").joinpath("hardware.yaml").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    classes = tuple(
        HardwareClass(
            name=str(c["name"]), description=str(c.get("description", "")), when=dict(c.get("when") or {}),
            context=int(c.get("context", 4096)), min_context=int(c.get("min_context", 2048)),
            offload=str(c.get("offload", "all")), threads=c.get("threads", "physical"),
            models=tuple(str(m) for m in c.get("models") or ()), slots=int(c.get("slots", 4)),
        )
        for c in data.get("classes") or ()
    )
    if not classes:
        raise HearthError(f"{path or 'profiles/hardware.yaml'}: no hardware classes")
    return Profiles(classes, int(float(data.get("margin_gib", 1)) * GIB))


def offload_possible(report: Report) -> bool:
    """False only when llama.cpp was asked and sees no GPU; unknown (a fixture, a peer) counts as yes."""
    return report.llama_cpp.gpu_offload is not False


def integrated_gpus(report: Report) -> tuple[Gpu, ...]:
    """Integrated GPUs with a working driver (they share system memory)."""
    return tuple(g for g in report.gpus if g.integrated and g.usable)


def classify(report: Report, profiles: Profiles, use_gpus: bool = True) -> HardwareClass:
    """The node's hardware class: the first in profile order that matches."""
    gpus = report.usable_gpus if use_gpus and offload_possible(report) else ()
    vram = sum(g.vram_total or 0 for g in gpus) / GIB
    igpus = integrated_gpus(report) if use_gpus else ()
    for cls in profiles.classes:
        if cls.matches(vram, report.memory / GIB, igpus, report.cpu.cores):
            return cls
    return profiles.classes[-1]


# --- the choice -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """What this node will serve and how, and why (one sentence)."""

    model: ModelSpec
    context: int
    gpu_layers: int
    """llama.cpp n_gpu_layers: -1 every layer, 0 none."""
    threads: int
    device: str
    """'gpu', 'unified' (an integrated GPU in shared memory), 'gpu+cpu' (partial offload) or 'cpu'."""
    estimate: Estimate
    reason: str
    hardware_class: str
    free: int
    """The memory it was fitted into (free VRAM, or available RAM), bytes."""
    slots: int = 1
    """Requests generated at once, each with *context* tokens (continuous batching)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON and the API."""
        return {"model": self.model.name, "label": self.model.label, "context": self.context,
                "slots": self.slots, "gpu_layers": self.gpu_layers, "threads": self.threads, "device": self.device,
                "estimate": self.estimate.to_dict(), "reason": self.reason,
                "hardware_class": self.hardware_class, "free": self.free}


@dataclass(frozen=True)
class _Budget:
    device: str
    free: int
    where: str


def _budgets(report: Report, cls: HardwareClass) -> list[_Budget]:
    ram = _Budget("cpu", report.memory_available, f"{gib(report.memory_available)} free RAM")
    if cls.uses_gpu and offload_possible(report) and report.usable_gpus:
        gpus = report.usable_gpus
        free = sum(g.vram_free if g.vram_free is not None else (g.vram_total or 0) for g in gpus)
        names = gpus[0].name if len(gpus) == 1 else f"{len(gpus)} GPUs ({' + '.join(g.name for g in gpus)})"
        return [_Budget("gpu", free, f"{gib(free)} free VRAM on {names}")]
    igpu = cls.unified_gpu(integrated_gpus(report))
    if igpu and offload_possible(report):
        return [_Budget("unified", report.memory_available,
                        f"{gib(report.memory_available)} free shared memory for the {igpu.name}")]
    return [ram]


def _contexts(cls: HardwareClass, model: ModelSpec, forced: int = 0) -> list[int]:
    if forced:
        return [forced]
    top = min(cls.context, model.context_length or cls.context)
    out = [top]
    while out[-1] // 2 >= min(cls.min_context, top):
        out.append(out[-1] // 2)
    return out


def _ctx_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _threads(report: Report, cls: HardwareClass, override: int) -> int:
    if override:
        return override
    if isinstance(cls.threads, int) or str(cls.threads).isdigit():
        return int(cls.threads)
    return max(1, report.cpu.cores)


def _choice(model: ModelSpec, est: Estimate, budget: _Budget, report: Report, cls: HardwareClass,
            threads: int, gpu_layers: int | None, note: str = "") -> Choice:
    if gpu_layers is None:
        gpu_layers = -1 if budget.device in ("gpu", "unified") else 0
    device = budget.device
    if device == "gpu" and 0 < gpu_layers < model.n_layers:
        device = "gpu+cpu"
    # As many parallel slots as the profile allows and the memory holds, each with the whole context.
    slots, total = 1, est
    for n in range(max(1, cls.slots), 1, -1):
        more = estimate(model, est.context * n, est.margin)
        if more.total <= budget.free:
            slots, total = n, more
            break
    parallel = (f"; {slots} requests at once ({slots} slots of {_ctx_label(est.context)})" if slots > 1
                else "; one request at a time (memory holds one slot)" if cls.slots > 1 else "")
    reason = (f"{model.label}: needs {gib(total.need)} with {_ctx_label(est.context)} context{parallel}; "
              f"this node has {budget.where}{note}")
    return Choice(model, est.context, gpu_layers, threads, device, total, reason, cls.name, budget.free, slots)


def _resolve(name: str, catalogue: Sequence[ModelSpec]) -> ModelSpec | None:
    key = name.lower()
    for m in catalogue:
        if key in (m.name.lower(), m.display_name.lower(), m.label.lower(), m.file.lower()):
            return m
    # A profile may name a model without its quantization suffix ("qwen2.5-7b-instruct").
    return next((m for m in catalogue if m.name.lower().startswith(key + "-")), None)


def _with_local_facts(model: ModelSpec, models_dir: Path | None) -> ModelSpec:
    """Use the downloaded file's own metadata when it is in the store."""
    if not models_dir or not model.file or not (models_dir / model.file).is_file():
        return model
    try:
        from .models.gguf import model_facts

        return model.with_facts(model_facts(models_dir / model.file))
    except Exception as e:  # a broken download must not stop selection; the catalogue's figures stand
        log.warning("cannot read %s: %s; using catalogue figures", models_dir / model.file, e)
        return model


def _local_file(name: str, models_dir: Path | None) -> ModelSpec | None:
    if not models_dir or not name.endswith(".gguf") or not (models_dir / name).is_file():
        return None
    from .models.gguf import model_facts

    facts = model_facts(models_dir / name)
    spec = ModelSpec(name=name, display_name=facts.name or name, size_bytes=facts.file_size, n_layers=1,
                     n_kv_heads=1, key_length=128, value_length=128, context_length=8192, file=name)
    return spec.with_facts(facts)


def select(report: Report, config: Any = None, catalogue: Sequence[ModelSpec] | None = None,
           profiles: Profiles | None = None, models_dir: Path | None = None) -> Choice | None:
    """The model this node should serve, or None when the config says ``model.name: none``.

    *config* is a hearth.config.Config (its model.* settings override the profile); *catalogue*
    defaults to profiles/models.yaml and *models_dir* to the config's store, where downloaded files'
    own metadata replace the catalogue's figures.

    Raises NothingFits when no model fits, ModelTooBig when the configured one cannot, UnknownModel
    when the configured name is neither in the catalogue nor a GGUF file in the store.
    """
    profiles = profiles or load_profiles()
    catalogue = list(catalogue) if catalogue is not None else load_catalogue()
    settings = getattr(config, "model", None)
    name = str(getattr(settings, "name", "auto") or "auto")
    forced_ctx = int(getattr(settings, "context", 0) or 0)
    forced_layers = int(getattr(settings, "gpu_layers", -1))
    threads_override = int(getattr(settings, "threads", 0) or 0)
    if models_dir is None and config is not None and hasattr(config, "models_dir"):
        models_dir = config.models_dir
    if name == "none":
        return None
    report = within_cap(report, settings)
    use_gpus = forced_layers != 0
    cls = classify(report, profiles, use_gpus=use_gpus)
    threads = _threads(report, cls, threads_override)
    if name != "auto":
        model = _resolve(name, catalogue) or _local_file(name, models_dir)
        if model is None:
            close = difflib.get_close_matches(name, [m.name for m in catalogue], n=3)
            raise UnknownModel(f"model.name {name!r} is neither in the catalogue nor a GGUF file in the store",
                               hint=("did you mean " + ", ".join(close) + "?") if close
                               else "see 'hearth models' for the catalogue, or set model.name: auto")
        return _forced(report, cls, _with_local_facts(model, models_dir), catalogue, profiles, forced_ctx,
                       forced_layers, threads, models_dir)
    choice = _auto(report, cls, catalogue, profiles, forced_ctx, threads, models_dir)
    if choice is None and cls.uses_gpu:
        # Nothing fits the GPUs: run on the CPU with what the CPU class of this machine would get.
        cpu_cls = classify(report, profiles, use_gpus=False)
        choice = _auto(report, cpu_cls, catalogue, profiles, forced_ctx, _threads(report, cpu_cls, threads_override),
                       models_dir)
    if choice is None:
        raise _nothing_fits(report, cls, catalogue, profiles, capped=bool(getattr(settings, "max_ram_mib", 0)))
    if forced_layers > 0 and choice.device == "gpu":
        device = "gpu+cpu" if forced_layers < choice.model.n_layers else "gpu"
        choice = replace(choice, gpu_layers=forced_layers, device=device)
    return choice


def within_cap(report: Report, settings: Any) -> Report:
    """*report* as this node's own model may use it: ``model.max_ram_mib`` caps the RAM, total and free, so
    the profile picks as for a machine that size (classes are chosen by RAM too)."""
    cap = int(getattr(settings, "max_ram_mib", 0) or 0) * MIB
    if not cap or (report.memory <= cap and report.memory_available <= cap):
        return report
    return replace(report, memory=min(report.memory, cap), memory_available=min(report.memory_available, cap))


def _candidates(cls: HardwareClass, catalogue: Sequence[ModelSpec]) -> list[ModelSpec]:
    preferred = [m for m in (_resolve(n, catalogue) for n in cls.models) if m is not None]
    # Then everything else, biggest first, chat (instruct) models before base models.
    rest = sorted((m for m in catalogue if m not in preferred),
                  key=lambda m: (not _is_instruct(m), -m.size_bytes))
    return preferred + rest


def _is_instruct(model: ModelSpec) -> bool:
    return bool(getattr(model.entry, "instruct", True)) if model.entry is not None else True


def _auto(report: Report, cls: HardwareClass, catalogue: Sequence[ModelSpec], profiles: Profiles,
          forced_ctx: int, threads: int, models_dir: Path | None) -> Choice | None:
    budgets = _budgets(report, cls)
    for model in _candidates(cls, catalogue):
        model = _with_local_facts(model, models_dir)
        for ctx in _contexts(cls, model, forced_ctx):
            est = estimate(model, ctx, profiles.margin)
            for budget in budgets:
                if est.total <= budget.free:
                    return _choice(model, est, budget, report, cls, threads, None, _gpu_note(report, budget))
    return None


def _gpu_note(report: Report, budget: _Budget) -> str:
    if budget.device == "cpu" and report.usable_gpus and not offload_possible(report):
        return f" (the {report.usable_gpus[0].name} is not used: llama.cpp sees no GPU it can use)"
    return ""


def _forced(report: Report, cls: HardwareClass, model: ModelSpec, catalogue: Sequence[ModelSpec],
            profiles: Profiles, forced_ctx: int, forced_layers: int, threads: int,
            models_dir: Path | None) -> Choice:
    ram = _Budget("cpu", report.memory_available, f"{gib(report.memory_available)} free RAM")
    budgets = [ram] if forced_layers == 0 else _budgets(report, cls)
    if budgets[-1].device != "cpu":
        budgets.append(ram)
    contexts = _contexts(cls, model, forced_ctx)
    for ctx in contexts:
        est = estimate(model, ctx, profiles.margin)
        gpu = budgets[0] if budgets[0].device == "gpu" else None
        if gpu and est.total <= gpu.free:
            return _choice(model, est, gpu, report, cls, threads, None if forced_layers < 0 else forced_layers)
        # Too big for the GPUs alone: split it (faster than the CPU alone) when both together hold it.
        partial = _partial(report, model, est, budgets) if gpu else None
        if partial is not None:
            layers, where = partial
            return _choice(model, est, _Budget("gpu+cpu", gpu.free + ram.free, where), report, cls, threads,  # type: ignore[union-attr]
                           layers)
        for budget in budgets:
            if budget.device != "gpu" and est.total <= budget.free:
                n = 0 if budget.device == "cpu" else (None if forced_layers < 0 else forced_layers)
                return _choice(model, est, budget, report, cls, threads, n, _gpu_note(report, budget))
    est = estimate(model, contexts[-1], profiles.margin)
    fits = []
    for other in sorted(catalogue, key=lambda m: (not _is_instruct(m), -m.size_bytes)):
        if other.size_bytes < model.size_bytes and any(
                estimate(other, c, profiles.margin).total <= max(b.free for b in budgets)
                for c in _contexts(cls, other, forced_ctx)):
            fits.append(other.label)
        if len(fits) == 3:
            break
    room = " and ".join(b.where for b in budgets)
    raise ModelTooBig(
        f"{model.label} does not fit: it needs {gib(est.total)} with {_ctx_label(est.context)} context "
        f"(including a {gib(profiles.margin)} margin); this node has {room}",
        hint=("models that fit here: " + ", ".join(fits) + "; or set model.name: auto") if fits
        else "no catalogue model fits here; add memory or serve from a bigger node in the household")


def _partial(report: Report, model: ModelSpec, est: Estimate, budgets: list[_Budget]) -> tuple[int, str] | None:
    """Split a model between GPU and CPU when it fits neither alone but both together."""
    if budgets[0].device != "gpu" or est.total > budgets[0].free + report.memory_available:
        return None
    per_layer = (est.weights + est.kv_cache) / max(1, model.n_layers)
    room = budgets[0].free - est.overhead - est.margin
    layers = int(room // per_layer) if per_layer else 0
    rest = est.need - layers * per_layer
    if layers <= 0 or rest + est.margin > report.memory_available:
        return None
    return layers, (f"{budgets[0].where} for {layers} of {model.n_layers} layers and "
                    f"{gib(report.memory_available)} free RAM for the rest")


def _nothing_fits(report: Report, cls: HardwareClass, catalogue: Sequence[ModelSpec],
                  profiles: Profiles, capped: bool = False) -> NothingFits:
    if not catalogue:
        return NothingFits("the model catalogue is empty", hint="reinstall Hearth (profiles/models.yaml is missing)")
    smallest = min(catalogue, key=lambda m: m.size_bytes)
    est = estimate(smallest, min(cls.min_context, smallest.context_length or cls.min_context), profiles.margin)
    return NothingFits(
        f"no model fits this node: the smallest, {smallest.label}, needs {gib(est.total)} with "
        f"{_ctx_label(est.context)} context (including a {gib(profiles.margin)} margin); "
        f"this node has {gib(report.memory_available)} free RAM" + (" for it (model.max_ram_mib)" if capped else ""),
        hint=("raise model.max_ram_mib or set it to 0" if capped else "close other programs or add memory")
        + ", or let a bigger node in the household serve")


@dataclass(frozen=True)
class PoolPick:
    """A model this node should run across the household pool: its profile prefers it to the best model
    that fits this node alone, and the household's offers hold it."""

    model: ModelSpec
    context: int
    estimate: Estimate
    members: tuple[str, ...]
    """The names of the nodes whose offers hold it, biggest first (this node among them when it offers)."""
    offered: int
    """What those offers add up to, bytes."""
    reason: str


def pool_pick(report: Report, offers: Sequence[Any], alone: Choice | None, config: Any = None,
              catalogue: Sequence[ModelSpec] | None = None, profiles: Profiles | None = None,
              models_dir: Path | None = None, self_node: str = "local") -> PoolPick | None:
    """The hardware class's preferred model to run across the pool, or None to serve *alone* only.

    *alone* is what ``select`` chose for this node by itself (None when nothing fits it); *offers* are
    the household's pool offers (hearth.pool.capacity.Offer: this node's, already less its own model,
    and its live peers', already less the nodes other pools hold: capacity.unclaimed). Only models the
    profile ranks above *alone* count, only offers whose rpc-server is up, and at least one peer's; a
    model some peer already serves as a pool is left to it (the mesh routes there). Nothing here stops
    *alone*: the pooled model comes besides it. None with ``model.name`` other than auto, or
    ``pool.enabled`` / ``pool.auto`` off.
    """
    settings = getattr(config, "model", None)
    pool = getattr(config, "pool", None)
    if str(getattr(settings, "name", "auto") or "auto").strip() != "auto":
        return None
    if pool is not None and not (pool.enabled and pool.auto):
        return None
    profiles = profiles or load_profiles()
    catalogue = list(catalogue) if catalogue is not None else load_catalogue()
    if models_dir is None and config is not None and hasattr(config, "models_dir"):
        models_dir = config.models_dir
    forced_ctx = int(getattr(settings, "context", 0) or 0)
    report = within_cap(report, settings)
    cls = classify(report, profiles, use_gpus=int(getattr(settings, "gpu_layers", -1)) != 0)
    ranked = _usable_offers(offers, self_node)
    if ranked is None:
        return None
    pooled_elsewhere = {m for o in offers if o.node != self_node for m in o.serving}
    for wanted in cls.models:
        model = _resolve(wanted, catalogue)
        if model is None:
            continue
        if alone is not None and model.name == alone.model.name:
            return None  # everything the profile ranks higher was tried: this node's own choice is its best
        if model.name in pooled_elsewhere:
            log.info("pool: %s is already served across the household pool by a peer", model.label)
            return None
        found = _pool_fit(_with_local_facts(model, models_dir), cls, ranked, profiles, forced_ctx, alone)
        if found is not None:
            return found
    return None


def _usable_offers(offers: Sequence[Any], self_node: str) -> list[Any] | None:
    """Offers a pool can use now (rpc-server up, something offered), each node once, biggest first; None
    without a peer among them (this node alone is no pool)."""
    usable: dict[str, Any] = {}
    for o in offers:
        if o.rpc_ready and o.total > 0:
            usable.setdefault(o.node, o)  # each node's memory once
    if not any(node != self_node for node in usable):
        return None
    return sorted(usable.values(), key=lambda o: -o.total)


def _pool_fit(model: ModelSpec, cls: HardwareClass, ranked: Sequence[Any], profiles: Profiles, forced_ctx: int,
              alone: Choice | None) -> PoolPick | None:
    """*model* across the offers *ranked* (biggest first) at the biggest context they hold, or None."""
    household = sum(o.total for o in ranked)
    for ctx in _contexts(cls, model, forced_ctx):
        est = estimate(model, ctx, profiles.margin)
        if est.total > household:
            continue
        members, held = [], 0
        for o in ranked:
            members.append(o.name)
            held += o.total
            if held >= est.total:
                break
        nodes = f"{len(members)} node{'s' if len(members) != 1 else ''}"
        instead = f"; this node serves {alone.model.label} by itself meanwhile" if alone is not None else ""
        reason = (f"{model.label}: needs {gib(est.total)} with {_ctx_label(ctx)} context, more than this node "
                  f"has; the household pool holds it on {nodes} ({' + '.join(members)}: {gib(held)} offered)"
                  f"{instead}")
        return PoolPick(model, ctx, est, tuple(members), held, reason)
    return None


def pool_only(report: Report, offers: Sequence[Any], alone: Choice | None,
              catalogue: Sequence[ModelSpec] | None = None, profiles: Profiles | None = None,
              self_node: str = "local") -> list[PoolPick]:
    """Every catalogue model that does not fit this node (*alone*'s memory) but fits across *offers*
    (unclaimed, this node's own among them), biggest first: what the wizard offers as "runs on 2
    household nodes"."""
    profiles = profiles or load_profiles()
    catalogue = list(catalogue) if catalogue is not None else load_catalogue()
    ranked = _usable_offers(offers, self_node)
    if ranked is None:
        return []
    cls = classify(report, profiles)
    free = alone.free if alone is not None else report.memory_available
    out = []
    for model in sorted(catalogue, key=lambda m: (not _is_instruct(m), -m.size_bytes)):
        if estimate(model, min(cls.min_context, model.context_length or cls.min_context), profiles.margin).total <= free:
            continue  # fits this node by itself: not a pool's job
        found = _pool_fit(model, cls, ranked, profiles, 0, alone)
        if found is not None:
            out.append(found)
    return out


def stand_in(report: Report, config: Any) -> tuple[Any, Choice] | None:
    """The biggest model already in the config's store that fits this hardware, with its Choice: what a
    node serves while the model it should serve is still being fetched (hearth.daemon), and what the
    wizard says will answer until then. None when nothing stored fits."""
    from .models.store import Store

    for stored in sorted(Store.from_config(config).list(), key=lambda m: -m.size):
        try:
            choice = select(report, config.replace(**{"model.name": stored.file}))
        except HearthError as e:
            log.info("%s in the store does not fit here: %s", stored.file, e.message)
            continue
        if choice is not None:
            return stored, choice
    return None
