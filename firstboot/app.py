"""The first-boot wizard: a Textual app for the console (tty1) and the serial line (ttyS0).

``main()`` is what hearth-firstboot@.service runs. Keyboard only, 80x24, the terminal's own ANSI
colours (a plain theme that reads the same on the Linux console and a vt220), ASCII borders on
terminals that may not draw box characters. The app owns the answers and the order of the screens;
probes run in workers at start so each screen has its facts when the person gets there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.screen import Screen

from .answers import Answers
from .messages import HardwareFound, ModelsFound, NetworkFound, PoolModelsFound
from .screens.admin import AdminScreen
from .screens.done import DoneScreen
from .screens.hardware import HardwareScreen
from .screens.household import HouseholdScreen
from .screens.model import ModelScreen
from .screens.name import NameScreen
from .screens.network import NetworkScreen
from .screens.review import ReviewScreen
from .screens.welcome import WelcomeScreen
from .services import ModelView, Services

log = logging.getLogger(__name__)

SCREENS_IN_ORDER: tuple[type[Screen[Any]], ...] = (
    WelcomeScreen, HardwareScreen, NetworkScreen, NameScreen, HouseholdScreen, ModelScreen, AdminScreen,
    ReviewScreen, DoneScreen)
ASCII_TERMS = ("vt100", "vt102", "vt220", "vt320", "dumb", "ansi")
"""Terminals (serial consoles) where only ASCII borders are safe."""


class FirstBootApp(App[int]):
    """The wizard."""

    CSS_PATH = "app.tcss"
    TITLE = "Hearth set-up"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", show=False, priority=True)]

    def __init__(self, services: Any = None, *, answers: Answers | None = None, preset_error: str | None = None,
                 cursor_blink: bool = True, ascii_only: bool | None = None) -> None:
        super().__init__()
        self.services = services or Services()
        self.answers = answers or Answers()
        self.preset_error = preset_error
        self.cursor_blink = cursor_blink
        self.ascii_only = ascii_only if ascii_only is not None else os.environ.get("TERM", "") in ASCII_TERMS
        self.hardware: Any = None
        self.network: Any = None
        self.models: Any = None
        """The Model screen's choices: this PC's own, with the household pool's (below) among them."""
        self._own_models: Any = None
        self.pool_models: tuple[Any, ...] = ()
        """Models that fit only across the household pool, once the household step has its code."""
        self._pool_code = ""
        self.applied = False
        self.default_hostname = self.services.machine_hostname()

    def on_mount(self) -> None:
        """Plain ANSI colours, then the first screen and the probes."""
        self.theme = "ansi-dark"
        if self.ascii_only:
            self.add_class("-ascii")
        self.push_screen(WelcomeScreen())
        self.probe_hardware()
        self.probe_network()
        # Stopped because the node was set up on another console (firstboot-done): leave the terminal
        # tidy, restored by Textual, instead of dying mid-draw.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.exit)

    # --- flow ------------------------------------------------------------------------------------
    def step_of(self, screen: Screen[Any]) -> tuple[int, int]:
        """(n, total) for the title line."""
        order = list(SCREENS_IN_ORDER)
        return (order.index(type(screen)) + 1, len(order)) if type(screen) in order else (0, len(order))

    def advance(self, screen: Screen[Any]) -> None:
        """Show the step after *screen*."""
        order = list(SCREENS_IN_ORDER)
        nxt = order[order.index(type(screen)) + 1]
        if isinstance(screen, HouseholdScreen):
            self.ask_household()
        self.push_screen(nxt())

    def ask_household(self) -> None:
        """Joining: ask the household's nodes what they offer the pool (a new household has no peers yet)."""
        code = self.answers.join_code if self.answers.household_mode == "join" else ""
        if code != self._pool_code:
            self._pool_code = code
            self.post_message(PoolModelsFound(()))  # another household's offers no longer count
            if code and hasattr(self.services, "pool_models"):
                self.find_pool_models(code)

    @work(thread=True, exclusive=True, group="household-pool")
    def find_pool_models(self, code: str) -> None:
        """The models that fit only across the household pool (network I/O: off the UI thread)."""
        for _ in range(600):  # the hardware probe comes first; it takes seconds
            if self.hardware is not None:
                break
            time.sleep(0.1)
        if self.hardware is None:
            return
        try:
            options = tuple(self.services.pool_models(self.hardware, code))
        except Exception:  # the pool's models are extra: losing them must not cost the wizard
            log.exception("asking the household failed")
            return
        if code == self._pool_code:
            self.post_message(PoolModelsFound(options))

    # --- workers: probes run off the UI thread -----------------------------------------------------
    @work(thread=True, group="probe")
    def probe_hardware(self) -> None:
        """Probe the hardware, then work out the model choices."""
        try:
            view = self.services.hardware()
        except Exception as e:  # a probe bug is a line on the Hardware screen, not a crash
            log.exception("hardware probe failed")
            from .services import HardwareView

            view = HardwareView((), "", f"The hardware probe failed: {e}")
        self.post_message(HardwareFound(view))
        try:
            models = self.services.models(view)
        except Exception as e:
            log.exception("model selection failed")
            from .services import ModelOption, ModelView

            models = ModelView((ModelOption("auto", "Let the node decide when it starts"),), f"No model list: {e}")
        self.post_message(ModelsFound(models))

    @work(thread=True, group="probe")
    def probe_network(self) -> None:
        """List interfaces and scan Wi-Fi."""
        try:
            view = self.services.network()
        except Exception as e:
            log.exception("network probe failed")
            from .services import NetworkView

            view = NetworkView()
            self.notify(f"Could not list the network ports: {e}", severity="warning")
        self.post_message(NetworkFound(view))

    @work(thread=True, group="keymap")
    def load_console_keymap(self, keymap: str) -> None:
        """Load the layout on the console now (only on a real VT of this machine)."""
        loader = getattr(self.services, "load_keymap", None)
        if loader:
            loader(keymap)

    def on_hardware_found(self, message: HardwareFound) -> None:
        """Keep the report and tell the open screen."""
        self.hardware = message.view
        self._forward(HardwareFound(message.view))

    def on_network_found(self, message: NetworkFound) -> None:
        """Keep the interfaces and tell the open screen."""
        self.network = message.view
        self._forward(NetworkFound(message.view))

    def on_models_found(self, message: ModelsFound) -> None:
        """Keep the model choices and tell the open screen."""
        self._own_models = message.view
        self._show_models()

    def on_pool_models_found(self, message: PoolModelsFound) -> None:
        """Keep the household pool's models and tell the open screen."""
        self.pool_models = tuple(message.options)
        self._show_models()

    def _show_models(self) -> None:
        """This PC's catalogue choices, then the pool's, then USB files and 'No model for now'."""
        own = self._own_models
        if own is None:
            return
        options = tuple(own.options)
        if self.pool_models:
            taken = {o.name for o in options}
            extra = tuple(o for o in self.pool_models if o.name not in taken)
            at = next((i for i, o in enumerate(options) if o.file is not None or o.name == "none"), len(options))
            options = options[:at] + extra + options[at:]
        self.models = own if not self.pool_models else ModelView(options, getattr(own, "problem", None))
        self._forward(ModelsFound(self.models))

    def _forward(self, message: Any) -> None:
        if isinstance(self.screen, HardwareScreen | NetworkScreen | ModelScreen):
            self.screen.post_message(message)


def _draw_on_the_terminal() -> None:
    """Textual draws on stderr. Started by systemd with StandardError=journal (or piped by anyone), it
    would draw into the journal and leave the console blank: give stderr the terminal stdin reads from."""
    if os.isatty(0) and not os.isatty(2):
        log.warning("stderr is not the terminal: drawing on %s instead", os.ttyname(0))
        os.dup2(0, 2)


def main(argv: list[str] | None = None) -> int:
    """Run the wizard (hearth-firstboot); 0 when the node was set up, 1 when left unfinished."""
    parser = argparse.ArgumentParser(prog="hearth-firstboot", description="Hearth's first-boot wizard.")
    parser.add_argument("--root", type=Path, default=Path("/"), help="root directory to set up (default /)")
    parser.add_argument("--ascii", action="store_true", help="ASCII borders only (serial terminals)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, filename=os.environ.get("HEARTH_FIRSTBOOT_LOG") or None)
    _draw_on_the_terminal()
    services = Services(args.root)
    answers, error = None, None
    try:
        found = services.preset()
    except Exception as e:  # an unreadable stick must not keep the wizard from starting
        found, error = None, f"could not read the preset: {e}"
    if found is not None and not found.valid:
        answers, error = Answers.from_prefill(found.prefill), found.error
    app = FirstBootApp(services, answers=answers, preset_error=error, ascii_only=args.ascii or None)
    code = app.run(mouse=False)  # no mouse tracking codes on a serial line
    if app.applied or (args.root / "var/lib/hearth/configured").exists():
        return 0  # set up here, or on another console while this one waited
    return int(code or 1)


if __name__ == "__main__":
    sys.exit(main())
