"""Name: the node's hostname (hearth-xxxx from the machine id unless changed)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.widgets import Input, Static

from hearth.config import check_hostname

from .base import WizardScreen


class NameScreen(WizardScreen):
    """Asks for the hostname."""

    TITLE = "Name"
    HINT = "Enter: next   Esc: back"

    def body(self) -> ComposeResult:
        """Explanation and the hostname field."""
        yield Static("The name this PC has on your network. Other Hearth nodes and your apps see it "
                     "as <name>.local; its IP address is always shown too.", markup=False)
        yield Static("Name (lowercase letters, digits and '-'):", classes="label")
        yield Input(id="hostname", max_length=63)

    def load(self) -> None:
        """Prefill with the answer or the machine-id default."""
        field = self.query_one("#hostname", Input)
        field.value = self.answers.hostname or self.wizard.default_hostname
        field.focus()

    def save(self) -> None:
        """Remember what is typed, even when not yet valid."""
        self.answers.hostname = self.query_one("#hostname", Input).value.strip()

    @on(Input.Submitted, "#hostname")
    def submitted(self) -> None:
        """Check the name and go on."""
        value = self.query_one("#hostname", Input).value.strip()
        problem = check_hostname(value) if value else "must not be empty"
        if problem:
            self.show_error(f"The name {value!r} {problem}. Example: kitchen-pc")
            return
        self.next()
