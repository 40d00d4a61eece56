"""What every wizard screen shares: a title line with the step, an error line, a key hint line.

Screens read their fields from the app's Answers when they open (``load``) and write them back when
they are left in either direction (``save``), so going back keeps everything typed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Input, Static

if TYPE_CHECKING:
    from ..answers import Answers
    from ..app import FirstBootApp


class WizardScreen(Screen[None]):
    """A step of the wizard: subclasses give TITLE, STEP and ``body()``."""

    TITLE = ""
    HINT = "Enter: next   Esc: back   Tab: next field   Up/Down: choose"
    BACK = True
    BINDINGS = [Binding("escape", "back", "Back", show=False)]

    @property
    def wizard(self) -> FirstBootApp:
        """The app, typed."""
        return cast("FirstBootApp", self.app)

    @property
    def answers(self) -> Answers:
        """The answers so far."""
        return self.wizard.answers

    def compose(self) -> ComposeResult:
        """Title, the screen's own body, error line and hint."""
        number, total = self.wizard.step_of(self)
        step = f"step {number} of {total}" if number else ""
        yield Static(f"Hearth set-up   {step}   [b]{self.TITLE}[/b]", id="title", markup=True)
        yield from self.banner()
        with Vertical(id="body"):
            yield from self.body()
        yield Static("", id="error", markup=False)
        yield Static(self.HINT, id="hint", markup=False)

    def body(self) -> ComposeResult:
        """The screen's widgets."""
        yield from ()

    def banner(self) -> ComposeResult:
        """Lines that stay on top, outside the scrolling body."""
        yield from ()

    def on_mount(self) -> None:
        """Freeze cursor blink when asked (snapshots), then let the screen fill itself in."""
        for inp in self.query(Input):
            inp.cursor_blink = self.wizard.cursor_blink
            # A label in the top border stays visible once the placeholder is typed over.
            inp.border_title = inp.border_title or (inp.placeholder.split(",")[0].split(" (")[0] or None)
        self.load()

    def load(self) -> None:
        """Fill widgets from the answers."""

    def save(self) -> None:
        """Write widget values into the answers."""

    def show_error(self, message: str) -> None:
        """Show what is wrong (one or two lines) above the hint."""
        err = self.query_one("#error", Static)
        err.update(message)
        err.set_class(bool(message), "-shown")

    def action_back(self) -> None:
        """Go back one step, keeping what was typed."""
        if self.BACK and len(self.app.screen_stack) > 2:
            self.save()
            self.app.pop_screen()

    def next(self, **_: Any) -> None:
        """Save and go on to the next step."""
        self.save()
        self.show_error("")
        self.wizard.advance(self)
