"""Deterministic stand-ins for the wizard's services: hardware, network, peers and models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hearth.config import Config
from hearth.mesh import household
from hearth.setup import apply
from hearth.setup.network import Interface
from hearth_firstboot.services import HardwareView, ModelOption, ModelView, NetworkView, PeerCheck

CODE_SECRET = bytes(range(32))
NEW_CODE = household.code_for(CODE_SECRET)


@dataclass
class FakeServices:
    """What a PC with an RTX 3060, one cabled port and a Wi-Fi card would report; a household peer on demand."""

    root: Path
    wifi: bool = True
    peer_secret: bytes | None = None
    """The household secret a discovered peer holds; None means no peer answers."""
    calls: list[str] = field(default_factory=list)
    fail_step: str | None = None

    def hardware(self) -> HardwareView:
        return HardwareView(("CPU     AMD Ryzen 5 5600X 6-Core Processor, 6 cores / 12 threads",
                             "Memory  31.3 GiB (28.9 GiB free)",
                             "GPU     NVIDIA GeForce RTX 3060, 12.0 GiB: ready"),
                            "NVIDIA GeForce RTX 3060, 12.0 GiB: models up to ~14B on the GPU")

    def models(self, hw: Any) -> ModelView:
        return ModelView((
            ModelOption("qwen2.5-7b-instruct", "Qwen2.5 7B Instruct Q4_K_M",
                        "Qwen2.5-7B Q4_K_M: needs 5.9 GiB with 8k context, this node has 11.2 GiB free VRAM"),
            ModelOption("llama-3.2-3b-instruct", "Llama 3.2 3B Instruct Q4_K_M", "fits: needs 3.1 GiB"),
            ModelOption("tiny", "tiny.gguf (USB drive)", "import from /media/usb", self.root / "media/usb/tiny.gguf"),
            ModelOption("none", "No model for now", "serve nothing until you pick one"),
        ))

    def network(self) -> NetworkView:
        ifaces = [Interface("enp3s0", False, True, ("192.168.1.57/24",), "00:11:22:33:44:55")]
        if self.wifi:
            ifaces.append(Interface("wlp2s0", True, False, (), "00:11:22:33:44:66"))
        return NetworkView(ifaces, ["Home", "Neighbours"] if self.wifi else [], "wlp2s0" if self.wifi else None)

    def machine_hostname(self) -> str:
        return "hearth-7f3a"

    def load_keymap(self, keymap: str) -> None:
        self.calls.append(f"loadkeys {keymap}")

    def new_household_code(self) -> str:
        return NEW_CODE

    def check_code(self, code: str) -> str | None:
        try:
            household.verify_code(code)
        except household.InvalidCode as e:
            return f"{e.message}. {e.hint or ''}".strip()
        return None

    def check_code_with_peer(self, code: str, timeout: float = 5.0) -> PeerCheck:
        self.calls.append("peer-check")
        if self.peer_secret is None:
            return PeerCheck(False, "No other Hearth node answered on this network, so the code could not be "
                             "checked live. Its checksum is right: press Enter again to join anyway.")
        url = "http://192.168.1.23:8080"
        if household.verify_code(code) == self.peer_secret:
            return PeerCheck(True, f"The node at {url} accepted the code.", url)
        return PeerCheck(False, f"The node at {url} does not accept this code. Show it again on a member "
                         "with 'hearth household invite' and retype it.", url)

    def pool_models(self, hw: Any, code: str) -> tuple[ModelOption, ...]:
        """A household whose peer offers 20 GiB: the 32B runs on 2 nodes; another household's code: nothing."""
        self.calls.append("pool-models")
        if self.peer_secret is None or household.verify_code(code) != self.peer_secret:
            return ()
        return (ModelOption("qwen2.5-32b-instruct",
                            "Qwen2.5 32B Instruct Q4_K_M (runs on 2 household nodes, 21.5 GiB)",
                            "Qwen2.5 32B Instruct Q4_K_M needs 21.5 GiB, more than this node has: it runs across "
                            "the household pool on hearth-b + this node (23.1 GiB offered), fetched when the node "
                            "starts; a stored model answers until the pool forms"),)

    def preset(self) -> Any:
        return None

    def apply_steps(self, cfg: Config, model_file: Path | None) -> list[apply.Step]:
        steps = apply.steps(cfg, self.root, model_file=None, wifi_iface="wlp2s0")
        if self.fail_step:
            def boom() -> str:
                raise apply.SetupError(f"cannot write {self.fail_step}: No space left on device",
                                       hint="free some space on the stick, then press Enter to retry")
            steps = [apply.Step(s.name, boom) if s.name == self.fail_step else s for s in steps]
        return steps

    def addresses(self) -> str | None:
        return "192.168.1.57"


def screen_text(app: Any) -> str:
    """The screen as plain text, one line per terminal row (what a person on the console sees)."""
    update = app.screen._compositor.render_full_update()
    rows = ["".join(seg.text for strip in line for seg in strip).rstrip() for line in update.strips]
    return "\n".join(rows)
