"""Review & apply: every answer on one page, then each set-up step with its progress and result.

A failed step says what went wrong and what to do; Esc goes back to fix it with everything kept, and
Enter retries (every step is idempotent, so re-running is safe).
"""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.widgets import Button, Static

from hearth.errors import HearthError

from ..messages import ApplyFinished, StepProgress
from .base import WizardScreen

MARK = {"running": "[..]", "ok": "[ok]", "failed": "[!!]", "waiting": "[  ]"}


class ReviewScreen(WizardScreen):
    """Shows the answers and applies them."""

    TITLE = "Review & apply"
    HINT = "Enter: apply   Esc: back to change something"

    def body(self) -> ComposeResult:
        """Summary, step list, button."""
        yield Static("", id="summary", markup=False)
        yield Static("", id="steps", markup=False)
        yield Button("Apply", id="apply", variant="primary")

    def load(self) -> None:
        """Summarise the answers."""
        self.running = False
        self.lines: dict[int, str] = {}
        self.query_one("#summary", Static).update(summary(self.wizard))
        self.query_one("#apply", Button).focus()

    def action_back(self) -> None:
        """Not while applying."""
        if not self.running:
            super().action_back()

    @on(Button.Pressed, "#apply")
    def pressed(self) -> None:
        """Start applying."""
        if self.running:
            return
        self.running = True
        self.lines = {}
        self.show_error("")
        self.query_one("#apply", Button).disabled = True
        self.run_apply()

    @work(thread=True, exclusive=True, group="apply")
    def run_apply(self) -> None:
        """Run the set-up steps one by one (file I/O: off the UI thread), reporting each."""
        from hearth.setup.apply import run_step

        try:
            steps = self.wizard.services.apply_steps(self.answers.to_config(), self.answers.model_file)
        except HearthError as e:
            self.post_message(StepProgress(0, "Check answers", "failed", e.message, e.hint or ""))
            self.post_message(ApplyFinished(False))
            return
        for n, step in enumerate(steps):
            self.post_message(StepProgress(n, step.name, "running"))
            try:
                result = run_step(step)
            except HearthError as e:
                self.post_message(StepProgress(n, step.name, "failed", e.message, e.hint or ""))
                self.post_message(ApplyFinished(False))
                return
            except Exception as e:  # never a traceback on the console: say it and how to retry
                self.post_message(StepProgress(n, step.name, "failed", str(e), "press Enter to retry"))
                self.post_message(ApplyFinished(False))
                return
            self.post_message(StepProgress(n, step.name, "ok", result))
        self.post_message(ApplyFinished(True))

    def on_step_progress(self, message: StepProgress) -> None:
        """Update the step's line."""
        line = f"{MARK[message.state]} {message.name:<16} {message.detail}"
        if message.state == "failed":
            line = f"{MARK['failed']} {message.name}: {message.detail}"
            self.show_error(f"{message.name} failed: {message.detail}\nWhat to do: "
                            f"{message.hint or 'press Esc to change your answers, or Enter to retry'}")
        self.lines[message.index] = line
        self.query_one("#steps", Static).update("\n".join(self.lines[k] for k in sorted(self.lines)))

    def on_apply_finished(self, message: ApplyFinished) -> None:
        """On success show Done; on failure let the person retry or go back."""
        self.running = False
        button = self.query_one("#apply", Button)
        button.disabled = False
        if message.ok:
            self.wizard.applied = True
            self.next()
        else:
            button.label = "Retry"
            button.focus()


def summary(app: object) -> str:
    """The answers as a few aligned lines (secrets never shown)."""
    a = app.answers  # type: ignore[attr-defined]
    if a.net_mode == "static":
        net = f"fixed {a.address} on {a.interface}" + (f", gateway {a.gateway}" if a.gateway else "")
    elif a.net_mode == "wifi":
        net = f"Wi-Fi {a.wifi_ssid!r}" + (" with passphrase" if a.wifi_passphrase else " (open)")
    else:
        net = "automatic (DHCP) on every wired port"
    house = "create a new one" if a.household_mode == "create" else f"join with code {a.join_code[:14]}..."
    rows = [("Keyboard", a.keymap), ("Name", a.hostname or app.default_hostname),  # type: ignore[attr-defined]
            ("Network", net), ("Household", house),
            ("Model", (a.model_file.name if a.model_file else a.model) or "auto"),
            ("Admin", "password set" if a.password else "no password"),
            ("SSH", "on, with your key" if a.ssh_key else "off (no key)")]
    return "\n".join(f"{k:<10} {v}" for k, v in rows)
