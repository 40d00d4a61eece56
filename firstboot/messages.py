"""The wizard's messages: small dataclasses that workers post to the screens.

Textual's Message initialises itself in ``__post_init__``, so a ``@dataclass`` Message needs nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message


@dataclass
class HardwareFound(Message):
    """The hardware probe finished (a services.HardwareView)."""

    bubble = False  # the app forwards it to the open screen; it must not come back up

    view: Any


@dataclass
class NetworkFound(Message):
    """Interfaces and the Wi-Fi scan are known (a services.NetworkView)."""

    bubble = False

    view: Any


@dataclass
class ModelsFound(Message):
    """The model choices are known (a services.ModelView)."""

    bubble = False

    view: Any


@dataclass
class PoolModelsFound(Message):
    """Models that fit only across the household pool (services.ModelOption), once peers were asked."""

    bubble = False

    options: Any


@dataclass
class PeerChecked(Message):
    """A join code was checked live against a peer (a services.PeerCheck)."""

    bubble = False

    code: str
    result: Any


@dataclass
class StepProgress(Message):
    """One set-up step started ('running'), finished (its result) or failed (error and hint)."""

    bubble = False

    index: int
    name: str
    state: str
    """'running', 'ok' or 'failed'."""
    detail: str = ""
    hint: str = ""


@dataclass
class ApplyFinished(Message):
    """Every step ran (ok) or one failed (not ok)."""

    bubble = False

    ok: bool


@dataclass
class AddressFound(Message):
    """The node's IPv4 address for the Done screen (None when it has none yet)."""

    bubble = False

    address: str | None
