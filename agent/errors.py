"""The exceptions Hearth's library raises; entry points turn them into one line and an exit code."""

from __future__ import annotations


class HearthError(Exception):
    """An expected failure with a one-line message and, where the fix is known, a hint."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(HearthError):
    """The configuration file or a setting is invalid."""

    exit_code = 2


class UsageError(HearthError):
    """A command was called wrongly."""

    exit_code = 2
