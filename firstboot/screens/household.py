"""Household: create a new one (its join code shown to copy) or join one with a code from another node.

A typed code is checked at once against its checksum (a typo is caught with no traffic), then live
against a node found on the network; the person is told plainly which check failed and what to do.
"""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option

from ..messages import PeerChecked
from .base import WizardScreen


def code_lines(code: str) -> str:
    """A join code on two lines of groups, spaced to read aloud and copy by hand."""
    groups = code.split("-")
    half = (len(groups) + 1) // 2
    return "  ".join(groups[:half]) + "\n" + "  ".join(groups[half:])


class HouseholdScreen(WizardScreen):
    """Create or join."""

    TITLE = "Household"

    def body(self) -> ComposeResult:
        """The choice, the new code, and the join field."""
        yield Static("Hearth nodes in one household share their models and trust each other. "
                     "Create a household on your first node; join it from the others.", markup=False)
        yield OptionList(Option("Create a new household (this is my first Hearth)", id="create"),
                         Option("Join a household with a code from another node", id="join"), id="mode")
        with Vertical(id="create-panel"):
            yield Static("Join code for your other nodes (also shown later by 'hearth household invite'):",
                         markup=False)
            yield Static("", id="code", markup=False)
        with Vertical(id="join-panel"):
            yield Static("Code shown by 'hearth household invite' on a node of the household:", markup=False)
            code = Input(placeholder="HRTH-XXXX-XXXX-...", id="join-code")
            code.border_title = "join code"
            yield code
            yield Static("", id="join-status", markup=False)

    def load(self) -> None:
        """Show the new code (made once) and the current choice."""
        a = self.answers
        if not a.new_code:
            a.new_code = self.wizard.services.new_household_code()
        self.query_one("#code", Static).update(code_lines(a.new_code))
        self.query_one("#join-code", Input).value = a.join_code
        mode = self.query_one("#mode", OptionList)
        mode.highlighted = 1 if a.household_mode == "join" else 0
        self._panel(a.household_mode)
        mode.focus()
        self._override = ""

    def _panel(self, which: str) -> None:
        self.query_one("#create-panel").display = which == "create"
        self.query_one("#join-panel").display = which == "join"

    @on(OptionList.OptionHighlighted, "#mode")
    def highlighted(self, event: OptionList.OptionHighlighted) -> None:
        """Show the panel of the highlighted choice."""
        self._panel(str(event.option.id))

    def save(self) -> None:
        """Remember the choice and the typed code."""
        mode = self.query_one("#mode", OptionList)
        if mode.highlighted is not None:
            self.answers.household_mode = "join" if mode.highlighted == 1 else "create"
        self.answers.join_code = self.query_one("#join-code", Input).value.strip()

    @on(OptionList.OptionSelected, "#mode")
    def chosen(self, event: OptionList.OptionSelected) -> None:
        """Create goes on; join asks for the code."""
        self.answers.household_mode = str(event.option.id)
        if event.option.id == "create":
            self.next()
        else:
            self.query_one("#join-code", Input).focus()

    @on(Input.Submitted, "#join-code")
    def code_submitted(self) -> None:
        """Checksum first (instant), then a live check against a peer in a worker."""
        code = self.query_one("#join-code", Input).value.strip()
        self.answers.join_code = code
        if not code:
            self.show_error("Type the code shown on the other node, or press Up and choose Create.")
            return
        problem = self.wizard.services.check_code(code)
        if problem:
            self.show_error(f"That code is not right: {problem}")
            return
        if self._override == code:
            self.next()  # no peer could be asked; the person chose to join anyway
            return
        self.show_error("")
        self.query_one("#join-status", Static).update("Code looks right. Asking a node of the household...")
        self.check_live(code)

    @work(thread=True, exclusive=True, group="peer-check")
    def check_live(self, code: str) -> None:
        """Ask a discovered peer whether it accepts the code (network I/O: off the UI thread)."""
        result = self.wizard.services.check_code_with_peer(code)
        self.post_message(PeerChecked(code, result))

    def on_peer_checked(self, message: PeerChecked) -> None:
        """Go on when the peer accepted; otherwise say what failed."""
        status = self.query_one("#join-status", Static)
        result = message.result
        if result.ok:
            status.update(result.message)
            self.next()
            return
        status.update("")
        self.show_error(result.message)
        if result.peer is None:
            self._override = message.code  # nobody to ask: a second Enter joins on the checksum alone
