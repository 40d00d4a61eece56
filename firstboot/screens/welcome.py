"""Welcome: what Hearth is, and the keyboard layout (so everything typed later comes out right)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from .base import WizardScreen

KEYMAPS = (("us", "English (US)"), ("uk", "English (UK)"), ("de", "Deutsch"), ("fr", "Francais"),
           ("es", "Espanol"), ("it", "Italiano"), ("pt", "Portugues"), ("nl", "Nederlands"),
           ("se", "Svenska"), ("pl", "Polski"), ("jp106", "Japanese"))


class WelcomeScreen(WizardScreen):
    """The first screen."""

    TITLE = "Welcome"
    BACK = False
    HINT = "Up/Down: choose a keyboard layout   Enter: next"

    def banner(self) -> ComposeResult:
        """The preset's error, on top, when the stick's hearth.yaml could not be used."""
        if self.wizard.preset_error:
            yield Static(f"The preset on the stick was not used: {self.wizard.preset_error}\n"
                         "Its other answers are filled in; fix this one as you go.",
                         id="preset-error", markup=False)

    def body(self) -> ComposeResult:
        """Intro text and the keyboard list."""
        yield Static(
            "Hearth turns this PC into your household's private AI: it runs a language model "
            "here and answers apps on your network, like a small OpenAI server that never "
            "leaves your home.\n\nA few questions follow; Enter accepts the suggestion on each.",
            id="intro", markup=False)
        yield Static("Keyboard layout:", classes="label")
        yield OptionList(*[Option(f"{label} ({code})", id=code) for code, label in KEYMAPS], id="keymap")

    def load(self) -> None:
        """Highlight the current layout."""
        options = self.query_one("#keymap", OptionList)
        if self.wizard.preset_error:
            options.styles.max_height = 7  # the banner takes the room; the list scrolls instead of the page
        codes = [c for c, _ in KEYMAPS]
        options.highlighted = codes.index(self.answers.keymap) if self.answers.keymap in codes else 0
        options.focus()

    def save(self) -> None:
        """Remember the highlighted layout."""
        options = self.query_one("#keymap", OptionList)
        if options.highlighted is not None:
            self.answers.keymap = str(options.get_option_at_index(options.highlighted).id)

    @on(OptionList.OptionSelected, "#keymap")
    def chosen(self, event: OptionList.OptionSelected) -> None:
        """Use the layout on the console now and go on."""
        self.answers.keymap = str(event.option.id)
        self.wizard.load_console_keymap(self.answers.keymap)
        self.next()
