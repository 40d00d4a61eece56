"""Presets: a ``hearth.yaml`` on the stick's FAT partition answers the wizard for a headless boot.

People edit the file from Windows or macOS after flashing, so it may have a BOM or CRLF line ends. A
valid preset is applied with no keyboard; an invalid one opens the wizard prefilled with what was
good and the error on top. Secrets (Wi-Fi passphrase, admin password, join code) are removed from the
FAT file once applied, the file rewritten atomically with a comment where each one was.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import config as configmod
from ..config import Config
from ..errors import ConfigError
from ..fsutil import atomic_write
from . import apply as applymod

log = logging.getLogger(__name__)

SEARCH_PATHS = (
    "boot/hearth.yaml",
    "efi/hearth.yaml",
    "boot/efi/hearth.yaml",
    "run/hearth-cfg/hearth.yaml",  # a partition labelled HEARTH-CFG, mounted there by hearth-preset.service
)
"""Where a preset may be, relative to the root: the stick's ESP (/boot or /efi) or a HEARTH-CFG partition."""

SECRET_KEYS = tuple(row.key for row in configmod.SETTINGS if row.secret)


@dataclass(frozen=True)
class Preset:
    """A preset file as read: its config when valid, else the error and what could be kept."""

    path: Path
    config: Config | None
    error: str | None = None
    hint: str | None = None
    prefill: dict[str, Any] = field(default_factory=dict)
    """Dotted keys whose values were good, for the wizard to start from when the preset is invalid."""

    @property
    def valid(self) -> bool:
        """Whether the preset can be applied as it is."""
        return self.config is not None


PATHS_FILE = "usr/lib/hearth/preset-paths"
"""The image's list of preset locations (one absolute path per line), searched before SEARCH_PATHS."""


def search_paths(root: Path = Path("/")) -> list[str]:
    """Where to look, relative to *root*: the image's list first, then the built-in one."""
    try:
        listed = [ln.strip().lstrip("/") for ln in (Path(root) / PATHS_FILE).read_text().splitlines()
                  if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError:
        listed = []
    return list(dict.fromkeys([*listed, *SEARCH_PATHS]))


def find(root: Path = Path("/"), search: tuple[str, ...] | None = None) -> Path | None:
    """The first preset file under *root*, or None."""
    for rel in search if search is not None else search_paths(root):
        path = Path(root) / rel
        if path.is_file():
            return path
    return None


def _text(path: Path) -> str:
    return path.read_bytes().decode("utf-8-sig").replace("\r\n", "\n")


def read(path: Path) -> Preset:
    """Read and validate a preset (the settings table's checks, then the cross-setting ones)."""
    try:
        text = _text(path)
    except (OSError, UnicodeDecodeError) as e:
        return Preset(path, None, f"cannot read {path}: {e}", "save it as UTF-8 text", {})
    try:
        cfg = configmod.parse(text, str(path))
    except ConfigError as e:
        return Preset(path, None, e.message, e.hint, prefill(text))
    problems = applymod.validate(cfg)
    if problems:
        return Preset(path, None, f"{path}: {problems[0]}", "fix the file or answer in the wizard", prefill(text))
    return Preset(path, cfg)


def prefill(text: str) -> dict[str, Any]:
    """Every setting in *text* that is valid on its own, by dotted key (for an invalid preset)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    good: dict[str, Any] = {}
    if not isinstance(data, dict):
        return good
    for section, body in data.items():
        if not isinstance(body, dict):
            continue
        for name, value in body.items():
            key = f"{section}.{name}"
            try:
                cfg = configmod.from_dict({section: {name: value}})
            except (ConfigError, TypeError):
                continue
            good[key] = getattr(getattr(cfg, str(section)), str(name))
    return good


def has_secrets(path: Path) -> bool:
    """Whether the preset file still holds a non-empty secret."""
    try:
        data = yaml.safe_load(_text(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return bool(_secret_values(data))


def _secret_values(data: Any) -> list[str]:
    found = []
    if isinstance(data, dict):
        for key in SECRET_KEYS:
            section, _, name = key.partition(".")
            body = data.get(section)
            if isinstance(body, dict) and body.get(name) not in (None, ""):
                found.append(key)
    return found


def scrub(path: Path) -> list[str]:
    """Remove the secrets from the preset file in place (atomically); returns the keys removed.

    Each secret's lines become a comment saying it was applied, so the rest of the file (and the
    person's own comments) stay as they were.
    """
    raw = path.read_bytes().decode("utf-8-sig")
    newline = "\r\n" if "\r\n" in raw else "\n"
    text = raw.replace("\r\n", "\n")
    lines = text.split("\n")
    removed: list[str] = []
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    spans: list[tuple[int, int, str, int]] = []
    if isinstance(root, yaml.MappingNode):
        for knode, vnode in root.value:
            if not isinstance(vnode, yaml.MappingNode) or vnode.flow_style:
                continue
            secret = [(k2, v2) for k2, v2 in vnode.value if f"{knode.value}.{k2.value}" in SECRET_KEYS
                      and not (isinstance(v2, yaml.ScalarNode) and v2.value == "")]
            for k2, v2 in secret:
                last = v2.end_mark.line if v2.end_mark.column > 0 else v2.end_mark.line - 1
                spans.append((k2.start_mark.line, max(last, k2.start_mark.line), f"{knode.value}.{k2.value}",
                              k2.start_mark.column))
            if secret and len(secret) == len(vnode.value):
                # The section would be left empty (null), which the config refuses: make it an empty mapping.
                line = knode.end_mark.line
                col = lines[line].index(":", knode.end_mark.column)
                lines[line] = lines[line][:col + 1] + " {}" + lines[line][col + 1:]
    for first, last, key, col in sorted(spans, reverse=True):
        name = key.partition(".")[2]
        lines[first:last + 1] = [" " * col + f"# {name}: applied on {stamp} and removed from this file"]
        removed.append(key)
    out = "\n".join(lines)
    data = yaml.safe_load(out)
    left = _secret_values(data)
    if left:  # flow style ({password: x}) or something line edits cannot reach: rewrite it whole
        for key in left:
            section, _, name = key.partition(".")
            del data[section][name]
        removed += left
        out = ("# Hearth preset; secrets (" + ", ".join(left) + f") applied on {stamp} and removed.\n"
               + yaml.safe_dump(data, sort_keys=False))
    if removed:
        atomic_write(path, out.replace("\n", newline), mode=path.stat().st_mode & 0o777)
    return sorted(removed)


@dataclass(frozen=True)
class Outcome:
    """What the preset path did: 'none' (no file), 'applied', 'invalid' or 'configured' (already set up)."""

    status: str
    preset: Preset | None = None
    steps: list[tuple[str, str]] = field(default_factory=list)
    scrubbed: list[str] = field(default_factory=list)


def run(root: Path = Path("/"), path: Path | None = None,
        progress: Callable[[str, str], None] | None = None) -> Outcome:
    """Find, validate and apply a preset with no keyboard; scrub its secrets once applied.

    An invalid preset is left untouched (the wizard opens prefilled); a failure while applying raises.
    """
    root = Path(root)
    path = path or find(root)
    if path is None:
        return Outcome("none")
    if applymod.is_configured(None, root):
        # Applied on an earlier boot that stopped before scrubbing: finish that job.
        return Outcome("configured", None, [], _scrub_quietly(path))
    preset = read(path)
    if preset.config is None:
        log.warning("preset %s is invalid: %s", path, preset.error)
        return Outcome("invalid", preset)
    done = applymod.apply(preset.config, root, progress=progress)
    return Outcome("applied", preset, done, _scrub_quietly(path))


def _scrub_quietly(path: Path) -> list[str]:
    """Scrub if there is anything to scrub; a read-only source (a credential) is logged, not fatal."""
    if not has_secrets(path):
        return []
    try:
        return scrub(path)
    except OSError as e:
        log.warning("could not remove the secrets from %s: %s", path, e)
        return []
