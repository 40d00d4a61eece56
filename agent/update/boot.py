"""What the booted node is: firmware, its version, and the boot entries (UKIs) systemd-boot counts.

A UKI on the ESP is ``EFI/Linux/hearth_VERSION[+LEFT[-DONE]].efi``: ``+LEFT-DONE`` is systemd-boot's try
counter (Boot Loader Specification, "Boot counting"); no counter means blessed; ``+0-N`` means bad (every
try used up). systemd-boot prefers the newest version with tries left, so a bad entry is passed over.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .sums import UpdateError

_ENTRY = re.compile(r"^hearth_(?P<version>.+?)(?:\+(?P<left>\d+)(?:-(?P<done>\d+))?)?\.efi$")
EFI_VARS = Path("/sys/firmware/efi/efivars")
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
"""systemd-boot's vendor GUID for its EFI variables (LoaderEntrySelected, ...)."""

BIOS_REFUSAL = (
    "this node booted through legacy BIOS (grub), which has no boot counting: an update could not roll "
    "back by itself, so BIOS nodes are not updated in place"
)
BIOS_HINT = ("boot this stick once on a UEFI PC (or in UEFI mode) and run 'hearth update apply' there; "
             "BIOS boots then follow the last blessed version")


@dataclass(frozen=True)
class Entry:
    """One UKI boot entry on the ESP."""

    file: str
    version: str
    left: int | None
    done: int | None

    @property
    def id(self) -> str:
        """systemd-boot's id for the entry: the file name without the counter (LoaderEntrySelected)."""
        return f"hearth_{self.version}.efi"

    @property
    def state(self) -> str:
        """good (blessed), bad (no tries left) or trying (counting down)."""
        if self.left is None:
            return "good"
        return "bad" if self.left == 0 else "trying"


def parse_entry(name: str) -> Entry | None:
    """The Entry a UKI file name describes, or None for files that are not Hearth's UKIs."""
    m = _ENTRY.match(name)
    if not m:
        return None
    left = int(m.group("left")) if m.group("left") is not None else None
    done = int(m.group("done")) if m.group("done") is not None else (0 if left is not None else None)
    return Entry(name, m.group("version"), left, done)


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """A sort key that orders versions the way systemd does for plain ones (1 < 2 < 10, 1.9 < 1.10)."""
    parts = re.findall(r"\d+|[A-Za-z]+", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def entries(esp: Path) -> list[Entry]:
    """Hearth's boot entries on the ESP mounted at *esp*, newest version first."""
    folder = esp / "EFI" / "Linux"
    found = [e for p in (folder.iterdir() if folder.is_dir() else ()) if (e := parse_entry(p.name))]
    return sorted(found, key=lambda e: version_key(e.version), reverse=True)


def image_version(os_release: Path = Path("/usr/lib/os-release")) -> str | None:
    """IMAGE_VERSION of the running /usr (mkosi's ImageVersion), or None (an image without A/B updates)."""
    try:
        text = os_release.read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "IMAGE_VERSION":
            return value.strip().strip("\"'") or None
    return None


def booted_uefi(sys_firmware: Path = Path("/sys/firmware/efi")) -> bool:
    """Whether this boot came through UEFI firmware (else legacy BIOS)."""
    return sys_firmware.is_dir()


def selected_entry(efivars: Path = EFI_VARS) -> str | None:
    """The boot entry systemd-boot started this time (LoaderEntrySelected), e.g. 'hearth_2+2-1.efi'."""
    try:
        raw = (efivars / f"LoaderEntrySelected-{LOADER_GUID}").read_bytes()
    except OSError:
        return None
    # 4 bytes of attributes, then a NUL-terminated UTF-16LE string.
    return raw[4:].decode("utf-16-le", errors="replace").rstrip("\x00") or None


def find(all_entries: list[Entry], selected: str | None) -> Entry | None:
    """The entry *selected* names (an id or a file name, with or without its counter), or None."""
    want = parse_entry(selected) if selected else None
    return next((e for e in all_entries if want and e.id == want.id), None)


def fallback(all_entries: list[Entry], current: str | None) -> Entry | None:
    """The entry systemd-boot would start instead of *current* if *current* were bad: newest not-bad other."""
    me = find(all_entries, current)
    for e in all_entries:
        if e != me and e.state != "bad":
            return e
    return None


def require_uefi(sys_firmware: Path = Path("/sys/firmware/efi")) -> None:
    """Raise UpdateError (the BIOS refusal) unless this boot is UEFI."""
    if not booted_uefi(sys_firmware):
        raise UpdateError(BIOS_REFUSAL, hint=BIOS_HINT)
