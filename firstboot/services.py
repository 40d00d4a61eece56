"""What the wizard asks of the rest of Hearth, behind one seam so screens can be tested with fakes.

Every method calls the agent's library (hardware probe, model selection, household codes, set-up);
imports happen inside the methods, so a part that is missing or broken costs one clear message on
one screen, not the wizard. Methods block (they probe, scan, talk to peers): screens call them from
``@work(thread=True)`` workers, never on the UI thread. Nothing here imports the model runtime.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GIB = 1 << 30
_SIZES = (0.5, 1, 1.5, 3, 4, 7, 8, 12, 14, 24, 32, 70)
"""Model sizes people meet (billions of parameters), for 'models up to ~14B'."""


@dataclass(frozen=True)
class HardwareView:
    """What the Hardware screen shows: one line per device and what they mean together."""

    lines: tuple[str, ...]
    meaning: str
    problem: str | None = None
    report: Any = None


@dataclass(frozen=True)
class ModelOption:
    """One model the person can pick: name to put in model.name, a label and why."""

    name: str
    label: str
    reason: str = ""
    file: Path | None = None
    """A GGUF on a USB drive to import, when the option is one."""


@dataclass(frozen=True)
class ModelView:
    """The Model screen's choices: the recommended one first."""

    options: tuple[ModelOption, ...]
    problem: str | None = None


@dataclass(frozen=True)
class PeerCheck:
    """The result of checking a join code live against a peer."""

    ok: bool
    message: str
    peer: str | None = None


@dataclass
class NetworkView:
    """Interfaces and, when there is a wireless device, the networks it sees."""

    interfaces: list[Any] = field(default_factory=list)
    ssids: list[str] = field(default_factory=list)
    wifi_iface: str | None = None


def _label(label: str, on_disk: bool) -> str:
    return f"{label} (on this stick)" if on_disk else label


def models_up_to(memory_bytes: int) -> str:
    """'~14B' for 12 GiB: Q4_K_M needs about 0.6 GiB per billion parameters plus ~1.5 GiB of cache and runtime."""
    billions = (memory_bytes / GIB - 1.5) / 0.6
    fit = [s for s in _SIZES if s <= billions]
    if not fit:
        return "small models only (under 1B)"
    size = fit[-1]
    return f"models up to ~{size:g}B"


class Services:
    """The real thing: the agent's library on this machine (root '/' unless told)."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root

    # --- hardware and models ---------------------------------------------------------------------
    def hardware(self) -> HardwareView:
        """Probe the machine (without llama.cpp: the wizard never loads the model runtime)."""
        try:
            from hearth import hardware
        except ImportError as e:
            return HardwareView((), "", f"The hardware probe is not available ({e}).")
        report = hardware.probe(str(self.root), with_llama=False)
        return describe_hardware(report)

    def models(self, hw: HardwareView) -> ModelView:
        """The profile's choice with its reason, then the other catalogue models that fit, then USB GGUFs."""
        options: list[ModelOption] = []
        problem = None
        try:
            from hearth import select

            choice = select.select(hw.report) if hw.report is not None else None
            if choice is not None:
                on_disk = {m.name for m in self.stored_models()}
                reason = choice.reason
                if choice.model.name not in on_disk:
                    size = getattr(choice.model, "size_bytes", 0) or 0
                    reason += f". Downloads {size / GIB:.1f} GiB when the node starts" if size else \
                        ". Downloaded when the node starts"
                    # The agent's own rule for what serves meanwhile, so the screen says what will happen.
                    here = select.stand_in(hw.report, self._store_config())
                    if here is not None:
                        reason += f"; until then {here[0].name} (on this stick) answers"
                options.append(ModelOption(choice.model.name, _label(choice.model.label, choice.model.name in on_disk),
                                           reason))
                for spec in select.load_catalogue():
                    if spec.name == choice.model.name:
                        continue
                    need = select.estimate(spec, min(choice.context, 4096)).total
                    if need <= choice.free:
                        options.append(ModelOption(spec.name, _label(spec.label, spec.name in on_disk),
                                                   f"fits: needs {need / GIB:.1f} GiB"))
        except Exception as e:  # a selection failure is a message on the screen, never a crash
            log.warning("model selection failed: %s", e)
            problem = f"No model recommendation: {getattr(e, 'message', e)}"
        for path in self.usb_models():
            options.append(ModelOption(path.stem, f"{path.name} (USB drive)", f"import from {path.parent}", path))
        options.append(ModelOption("none", "No model for now", "serve nothing until you pick one"))
        return ModelView(tuple(options[:8] + options[-1:] if len(options) > 9 else options), problem)

    def pool_models(self, hw: HardwareView, code: str, peers: list[str] | None = None) -> tuple[ModelOption, ...]:
        """Models that fit only across the household pool ("runs on 2 household nodes"), biggest first.

        Asks the peers (*peers*, else those mDNS finds) for their signed state over the household channel
        with the secret of *code*, and weighs their pool offers with this node's own spare memory (what its
        own model would leave) through the agent's own rules (hearth.select.pool_only). Empty when no peer
        answers or offers enough; never raises."""
        try:
            from hearth import select
            from hearth.config import Config
            from hearth.mesh import household
            from hearth.mesh.client import household_states
            from hearth.pool.capacity import Offer, offer_devices, unclaimed

            if hw.report is None:
                return ()
            secret = household.verify_code(code)
            urls = peers if peers is not None else self.discover_peers()
            states = household_states(secret, urls) if urls else []
            offers = []
            for state in states:
                offer = Offer.from_dict(state.get("pool"))
                if offer is not None and offer.node == state.get("node"):  # a node speaks for itself only
                    offers.append(offer)
            try:
                alone = select.select(hw.report)
            except Exception:  # nothing fits this node alone: every pooled model is a gain
                alone = None
            # This node's own offer once it runs: what its own model leaves (its rpc-server will be up).
            need, device = (alone.estimate.total, alone.device) if alone is not None else (0, "cpu")
            own = Offer("this-node", "this node", offer_devices(Config(), hw.report, need, device), True)
            picks = select.pool_only(hw.report, unclaimed([own, *offers], own.node), alone, self_node=own.node)
        except Exception as e:  # no pool options is a quiet loss, never a crash
            log.warning("household pool: %s", getattr(e, "message", e))
            return ()
        on_disk = {m.name for m in self.stored_models()}
        options = []
        for p in picks:
            n = len(p.members)
            label = f"{p.model.label} (runs on {n} household node{'s' if n != 1 else ''}, {p.estimate.total / GIB:.1f} GiB)"
            reason = (f"{p.model.label} needs {p.estimate.total / GIB:.1f} GiB, more than this node has: it runs "
                      f"across the household pool on {' + '.join(p.members)} ({p.offered / GIB:.1f} GiB offered), "
                      "fetched when the node starts; a stored model answers until the pool forms")
            options.append(ModelOption(p.model.name, _label(label, p.model.name in on_disk), reason))
        return tuple(options)

    def _store_config(self) -> Any:
        """A config whose model store is the node's under this root (the agent's default state dir)."""
        from hearth import config as config_mod

        return config_mod.from_dict({"state": {"dir": str(self.root / "var/lib/hearth")}})

    def stored_models(self) -> list[Any]:
        """Models already in the node's store (the one bundled on the stick, say): no download needed."""
        try:
            from hearth.models.store import Store

            return list(Store.from_config(self._store_config()).list())
        except Exception as e:  # an unreadable store only loses the "on this stick" hint
            log.warning("model store: %s", e)
            return []

    def usb_models(self) -> list[Path]:
        """GGUF files on mounted removable drives (/media, /mnt, /run/media), a few levels deep."""
        found: list[Path] = []
        for base in ("media", "mnt", "run/media"):
            top = self.root / base
            if not top.is_dir():
                continue
            for depth in ("*.gguf", "*/*.gguf", "*/*/*.gguf", "*/*/*/*.gguf"):
                found += sorted(top.glob(depth))
        return found[:5]

    def load_keymap(self, keymap: str) -> None:
        """Switch the console's layout now (loadkeys), on this machine's own VT only."""
        import os
        import shutil
        import subprocess

        if self.root == Path("/") and os.environ.get("TERM") == "linux" and shutil.which("loadkeys"):
            subprocess.run(["loadkeys", "-q", keymap], capture_output=True, timeout=10)

    # --- network ---------------------------------------------------------------------------------
    def network(self) -> NetworkView:
        """Interfaces with link and address; a Wi-Fi scan when there is a wireless device."""
        from hearth.setup import network

        ifaces = network.interfaces(self.root / "sys/class/net")
        wireless = next((i.name for i in ifaces if i.wireless), None)
        ssids = network.wifi_scan(wireless) if wireless else []
        return NetworkView(ifaces, ssids, wireless)

    def machine_hostname(self) -> str:
        """hearth-xxxx from /etc/machine-id."""
        from hearth.setup import apply

        return apply.default_hostname(self.root)

    # --- household -------------------------------------------------------------------------------
    def new_household_code(self) -> str:
        """A join code for a new household (its secret is stored when the set-up is applied)."""
        from hearth.mesh import household

        return household.code_for(secrets.token_bytes(household.SECRET_BYTES))

    def check_code(self, code: str) -> str | None:
        """The local checksum check: None when the code is well formed, else what is wrong and what to do."""
        from hearth.mesh import household

        try:
            household.verify_code(code)
        except household.InvalidCode as e:
            return f"{e.message}. {e.hint or ''}".strip()
        return None

    def discover_peers(self, timeout: float = 3.0) -> list[str]:
        """Channel URLs (https, mesh port) of Hearth nodes announced over mDNS."""
        urls: list[str] = []
        try:
            from zeroconf import ServiceBrowser, Zeroconf

            from hearth.mesh import SERVICE_TYPE
        except ImportError as e:
            log.warning("no mDNS discovery: %s", e)
            return urls
        import threading

        found = threading.Event()
        zc = Zeroconf()

        class Listener:
            def add_service(self, zc_: Zeroconf, type_: str, name: str) -> None:
                info = zc_.get_service_info(type_, name, timeout=2000)
                mesh = (info.properties.get(b"mesh") or b"").decode() if info else ""
                if info and mesh.isdigit():  # the household channel's port (older nodes have none)
                    for addr in info.parsed_addresses():
                        urls.append(f"https://{addr}:{mesh}")
                    found.set()

            def update_service(self, *a: Any) -> None:
                pass

            def remove_service(self, *a: Any) -> None:
                pass

        try:
            ServiceBrowser(zc, SERVICE_TYPE, Listener())  # type: ignore[arg-type]
            found.wait(timeout)
        finally:
            zc.close()
        return urls

    def check_code_with_peer(self, code: str, timeout: float = 5.0) -> PeerCheck:
        """Check *code* live against a discovered peer; says clearly what failed."""
        from hearth.errors import HearthError
        from hearth.mesh import household

        peers = self.discover_peers()
        if not peers:
            return PeerCheck(False, "No other Hearth node answered on this network, so the code could not be "
                             "checked live. Its checksum is right: press Enter again to join anyway.")
        last = ""
        for url in peers:
            try:
                if household.check_code_with_peer(code, url, timeout=timeout):
                    return PeerCheck(True, f"The node at {url} accepted the code.", url)
                return PeerCheck(False, f"The node at {url} does not accept this code. Show it again on a "
                                 "member with 'hearth household invite' and retype it.", url)
            except HearthError as e:
                last = e.message
        return PeerCheck(False, f"No node could check the code ({last}). Press Enter again to join anyway.")

    # --- set-up ------------------------------------------------------------------------------------
    def preset(self) -> Any:
        """The stick's preset (hearth.setup.preset.Preset) or None."""
        from hearth.setup import preset

        path = preset.find(self.root)
        return preset.read(path) if path else None

    def apply_steps(self, cfg: Any, model_file: Path | None) -> list[Any]:
        """The set-up steps for *cfg* (hearth.setup.apply.Step), run one by one by the Review screen."""
        from hearth.setup import apply

        return apply.steps(cfg, self.root, model_file=model_file)

    def addresses(self) -> str | None:
        """The node's IPv4 address to show on the Done screen."""
        from hearth.setup import network

        return network.primary_address(network.interfaces(self.root / "sys/class/net"))


def describe_hardware(report: Any) -> HardwareView:
    """Lines for each CPU/GPU/NPU and what they mean for model size."""
    from hearth.hardware import gib

    cpu = report.cpu
    lines = [f"CPU     {cpu.model}, {cpu.cores} cores / {cpu.threads} threads",
             f"Memory  {gib(report.memory)} ({gib(report.memory_available)} free)"]
    for g in report.gpus:
        state = "ready" if g.usable else (g.note or "no driver")
        lines.append(f"GPU     {g.name}, {gib(g.vram_total) if g.vram_total else 'shared memory'}: {state}")
    for n in report.npus:
        lines.append(f"NPU     {n.name}: {'ready' if n.usable else (n.note or 'no driver')}")
    gpus = report.usable_gpus
    if gpus:
        best = max(gpus, key=lambda g: g.vram_total or 0)
        meaning = f"{best.name}, {gib(best.vram_total)}: {models_up_to(best.vram_total or 0)} on the GPU"
    else:
        meaning = f"No usable GPU: the CPU serves, {models_up_to(report.memory_available or report.memory)} in memory"
    return HardwareView(tuple(lines), meaning, None, report)
