"""Done: the node's address, its API URL, how to get an API key, and one line to copy into an app."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.widgets import Button, Static

from ..messages import AddressFound
from .base import WizardScreen


class DoneScreen(WizardScreen):
    """The last screen; Enter ends the wizard and the node starts serving."""

    TITLE = "Done"
    BACK = False
    HINT = "Enter: finish and start serving"

    def body(self) -> ComposeResult:
        """Address and instructions."""
        yield Static("This node is set up.", id="done-title", markup=False)
        yield Static("Finding this node's address...", id="where", markup=False)
        yield Button("Finish", id="finish", variant="primary")

    def load(self) -> None:
        """Look the address up off the UI thread."""
        self.query_one("#finish", Button).focus()
        self.find_address()

    @work(thread=True, exclusive=True, group="address")
    def find_address(self) -> None:
        """The node's IPv4 address (reads interfaces)."""
        self.post_message(AddressFound(self.wizard.services.addresses()))

    def on_address_found(self, message: AddressFound) -> None:
        """Show where to reach the node."""
        name = self.answers.hostname or self.wizard.default_hostname
        host = message.address or f"{name}.local"
        port = self.answers.base.api.port
        url = f"http://{host}:{port}/v1"
        self.url = url
        lines = [
            f"Name:     {name}   (also {name}.local)",
            f"Address:  {message.address or 'none yet - plug a network cable in'}",
            f"API:      {url}",
            "",
            "Get an API key: log in as admin here and run   hearth apikey",
            "Then give your app (any OpenAI-compatible client) this line and that key:",
            "",
            f"  OPENAI_BASE_URL={url}",
        ]
        self.query_one("#where", Static).update("\n".join(lines))

    @on(Button.Pressed, "#finish")
    def finish(self) -> None:
        """End the wizard: the service starts the agent."""
        self.app.exit(0)
