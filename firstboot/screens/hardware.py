"""Hardware: what the probe found and what it means for the models this PC can run."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.widgets import Button, Static

from ..messages import HardwareFound
from .base import WizardScreen


class HardwareScreen(WizardScreen):
    """Shows the hardware report (probed in a worker when the app started)."""

    TITLE = "Hardware"
    HINT = "Enter: next   Esc: back"

    def body(self) -> ComposeResult:
        """The device lines, their meaning, and a Next button."""
        yield Static("Looking at this PC's processor, memory and graphics cards...", id="devices", markup=False)
        yield Static("", id="meaning", markup=False)
        yield Button("Next", id="next", variant="primary")

    def load(self) -> None:
        """Show the report if the probe is done; else the HardwareFound message brings it."""
        self.query_one("#next", Button).focus()
        if self.wizard.hardware is not None:
            self.show(self.wizard.hardware)

    def show(self, view: object) -> None:
        """Fill in the report."""
        lines = getattr(view, "lines", ())
        problem = getattr(view, "problem", None)
        self.query_one("#devices", Static).update("\n".join(lines) if lines else (problem or "Nothing found."))
        meaning = getattr(view, "meaning", "")
        self.query_one("#meaning", Static).update(f"What this means: {meaning}" if meaning else "")

    def on_hardware_found(self, message: HardwareFound) -> None:
        """The probe finished while this screen was open."""
        self.show(message.view)

    @on(Button.Pressed, "#next")
    def pressed(self) -> None:
        """Go on."""
        self.next()
