"""Admin: the console password (twice, with a strength hint) and an optional SSH key."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.widgets import Input, Static

from hearth.config import check_ssh_key
from hearth.setup.password import check_password, strength

from .base import WizardScreen


class AdminScreen(WizardScreen):
    """Password and SSH key for the 'admin' user."""

    TITLE = "Admin"
    HINT = "Enter: next field   Tab: SSH key   Esc: back"

    def body(self) -> ComposeResult:
        """The fields."""
        yield Static("A password for the 'admin' user, to log in on this console.", markup=False)
        yield Input(placeholder="password (at least 8 characters)", password=True, id="password")
        yield Input(placeholder="the same password again", password=True, id="confirm")
        yield Static("", id="strength", markup=False)
        yield Static("Optional: an SSH public key (ssh-ed25519 AAAA...). SSH stays off without one.", markup=False)
        key = Input(placeholder="ssh-ed25519 AAAA... you@laptop", id="ssh-key")
        key.border_title = "SSH public key (optional)"
        yield key

    def load(self) -> None:
        """Refill what was typed."""
        a = self.answers
        self.query_one("#password", Input).value = a.password
        self.query_one("#confirm", Input).value = a.confirm
        self.query_one("#ssh-key", Input).value = a.ssh_key
        self.query_one("#password", Input).focus()

    def save(self) -> None:
        """Remember the fields (in memory only; apply stores a hash)."""
        a = self.answers
        a.password = self.query_one("#password", Input).value
        a.confirm = self.query_one("#confirm", Input).value
        a.ssh_key = self.query_one("#ssh-key", Input).value.strip()

    @on(Input.Changed, "#password")
    def rate(self, event: Input.Changed) -> None:
        """The strength hint, as the person types."""
        if not event.value:
            self.query_one("#strength", Static).update("")
            return
        word, hint = strength(event.value)
        self.query_one("#strength", Static).update(f"Strength: {word}" + ("" if hint == "good" else f" - {hint}"))

    @on(Input.Submitted, "#password")
    def password_done(self) -> None:
        """Enter moves to the confirmation."""
        self.query_one("#confirm", Input).focus()

    @on(Input.Submitted, "#confirm")
    @on(Input.Submitted, "#ssh-key")
    def done(self) -> None:
        """Check both passwords and the key, then go on."""
        self.save()
        problem = check_password(self.answers.password, self.answers.confirm)
        if problem:
            self.show_error(problem)
            self.query_one("#password" if len(self.answers.password) < 8 else "#confirm", Input).focus()
            return
        key_problem = check_ssh_key(self.answers.ssh_key)
        if key_problem:
            self.show_error(f"The SSH key {key_problem}; or leave it empty.")
            self.query_one("#ssh-key", Input).focus()
            return
        self.next()
