"""Model: the profile's choice with its reason, the other models that fit, those that fit only across the
household pool (once a join code is known), or a GGUF on a USB drive."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from ..messages import ModelsFound
from .base import WizardScreen


class ModelScreen(WizardScreen):
    """Pick the model this node serves."""

    TITLE = "Model"

    def body(self) -> ComposeResult:
        """The list and the highlighted option's reason."""
        yield Static("The model this node serves. The first is picked for this PC's memory; "
                     "you can change it later with 'hearth models'.", markup=False)
        yield OptionList(Option("Working out which models fit...", id="wait", disabled=True), id="models")
        yield Static("", id="reason", markup=False)

    def load(self) -> None:
        """Show the options if they are known; else ModelsFound brings them."""
        self.query_one("#models", OptionList).focus()
        if self.wizard.models is not None:
            self.show(self.wizard.models)

    def on_models_found(self, message: ModelsFound) -> None:
        """Selection finished while this screen was open."""
        self.show(message.view)

    def show(self, view: object) -> None:
        """Fill the list; keep the highlighted model (the household's pool models come in later), else
        highlight the current answer or the recommendation."""
        models = self.query_one("#models", OptionList)
        before = getattr(self, "_options", [])
        current = before[models.highlighted].name if models.highlighted is not None and \
            models.highlighted < len(before) else None
        self._options = list(getattr(view, "options", ()))
        models.clear_options()
        for n, opt in enumerate(self._options):
            tag = "  - recommended" if n == 0 and opt.file is None and opt.name != "none" else ""
            models.add_option(Option(f"{opt.label}{tag}", id=str(n)))
        names = [o.name for o in self._options]
        keep = current if current in names else self.answers.model
        models.highlighted = names.index(keep) if keep in names else 0
        problem = getattr(view, "problem", None)
        if problem:
            self.show_error(problem)

    @on(OptionList.OptionHighlighted, "#models")
    def highlighted(self, event: OptionList.OptionHighlighted) -> None:
        """Say why."""
        if event.option.id and event.option.id != "wait":
            opt = self._options[int(event.option.id)]
            self.query_one("#reason", Static).update(opt.reason)

    def save(self) -> None:
        """Remember the highlighted model."""
        models = self.query_one("#models", OptionList)
        options = getattr(self, "_options", [])
        if models.highlighted is not None and options and models.highlighted < len(options):
            opt = options[models.highlighted]
            self.answers.model, self.answers.model_file = opt.name, opt.file

    @on(OptionList.OptionSelected, "#models")
    def chosen(self) -> None:
        """Go on."""
        self.next()
