"""Legacy BIOS boots follow the last version blessed on UEFI (hearth-bios-follow.service).

grub (BIOS) has no boot counting, so a BIOS boot never installs an update; but after UEFI updates the
slot its build-time grub entry points at is reused, and that entry would no longer find its /usr. So
once a UEFI boot is blessed, this copies the blessed UKI's kernel, initrd and command line (which names
its usr slot by usrhash=) to the ESP for grub and switches grub.cfg to them: write new files, then
replace grub.cfg atomically, then remove the old ones. A BIOS boot therefore always starts a version
that has already proved itself healthy.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import sys
from pathlib import Path

from .boot import entries, find, selected_entry
from .sums import UpdateError

GRUB_CFG = Path("grub/grub.cfg")
"""grub's configuration on the ESP (mkosi writes it at build time)."""
BIOS_DIR = Path("hearth-bios")
"""Where the followed kernel and initrd live on the ESP, one folder per version."""


def pe_sections(path: Path) -> dict[str, tuple[int, int]]:
    """Section name -> (file offset, size) of a PE file such as a UKI (.linux, .initrd, .cmdline, ...)."""
    with path.open("rb") as f:
        head = f.read(4096)
        if head[:2] != b"MZ":
            raise UpdateError(f"{path.name} is not a PE (UKI) file")
        pe = struct.unpack_from("<I", head, 0x3C)[0]
        f.seek(pe)
        coff = f.read(24)
        if coff[:4] != b"PE\0\0":
            raise UpdateError(f"{path.name} is not a PE (UKI) file")
        count, opt_size = struct.unpack_from("<H", coff, 6)[0], struct.unpack_from("<H", coff, 20)[0]
        f.seek(pe + 24 + opt_size)
        table = f.read(40 * count)
    out = {}
    for i in range(count):
        name, vsize, _vaddr, raw_size, raw_ptr = struct.unpack_from("<8sIIII", table, 40 * i)
        out[name.rstrip(b"\0").decode("ascii", "replace")] = (raw_ptr, min(vsize, raw_size) if vsize else raw_size)
    return out


def _copy_section(uki: Path, where: tuple[int, int], dest: Path) -> None:
    offset, size = where
    with uki.open("rb") as src, dest.open("wb") as out:
        src.seek(offset)
        left = size
        while left:
            block = src.read(min(left, 1 << 20))
            if not block:
                raise UpdateError(f"{uki.name} is cut short")
            out.write(block)
            left -= len(block)
        out.flush()
        os.fsync(out.fileno())


def followed(esp: Path) -> str | None:
    """The version grub.cfg boots when it was written by follow(), else None (mkosi's build-time entry)."""
    try:
        m = re.search(r"^# hearth-bios-version: (\S+)$", (esp / GRUB_CFG).read_text(), re.M)
    except OSError:
        return None
    return m.group(1) if m else None


def follow(esp: Path, uki: Path, version: str) -> None:
    """Point grub (BIOS) at the kernel, initrd and command line of *uki* (version *version*)."""
    sections = pe_sections(uki)
    for needed in (".linux", ".initrd", ".cmdline"):
        if needed not in sections:
            raise UpdateError(f"{uki.name} has no {needed} section")
    with uki.open("rb") as f:
        f.seek(sections[".cmdline"][0])
        cmdline = f.read(sections[".cmdline"][1]).rstrip(b"\0\n ").decode()
    if any(c in cmdline for c in "\n\"'$;{}"):
        raise UpdateError(f"{uki.name}'s command line cannot be written into grub.cfg")
    folder = esp / BIOS_DIR / version
    folder.mkdir(parents=True, exist_ok=True)
    _copy_section(uki, sections[".linux"], folder / "vmlinuz")
    _copy_section(uki, sections[".initrd"], folder / "initrd")
    cfg = esp / GRUB_CFG
    old = cfg.read_text() if cfg.exists() else ""
    rel = f"/{BIOS_DIR}/{version}"
    text = (
        "set timeout=0\n"
        f"# hearth-bios-version: {version}\n"
        "# Written by hearth-bios-follow.service: legacy BIOS boots start the last version blessed on UEFI.\n"
        'if [ "${grub_platform}" = pc ]; then\n'
        f'menuentry "Hearth {version}" {{\n'
        f"    linux {rel}/vmlinuz {cmdline}\n"
        f"    initrd {rel}/initrd\n"
        "}\n"
        "fi\n"
    )
    tmp = cfg.with_name("grub.cfg.new")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, cfg)
    # Free the ESP: earlier followed versions, and mkosi's build-time type 1 files once nothing uses them.
    for other in (esp / BIOS_DIR).iterdir():
        if other.name != version:
            shutil.rmtree(other, ignore_errors=True)
    for path in re.findall(r"^\s*linux\s+/(\S+)/vmlinuz", old, re.M):
        top = Path(path).parts[0] if Path(path).parts else ""
        if top and top != str(BIOS_DIR) and (esp / top).is_dir():
            shutil.rmtree(esp / top, ignore_errors=True)
            for entry in (esp / "loader" / "entries").glob(f"{top}-*.conf"):
                entry.unlink()


def main(esp: Path = Path("/efi")) -> int:
    """Entry point of hearth-bios-follow.service (after systemd-bless-boot on UEFI boots)."""
    current = selected_entry()
    me = find(entries(esp), current)
    if me is None or me.state != "good":
        print(f"hearth-bios-follow: {current or 'this boot'} is not a blessed Hearth entry; grub unchanged")
        return 0
    if followed(esp) == me.version:
        return 0
    try:
        follow(esp, esp / "EFI" / "Linux" / me.file, me.version)
    except (UpdateError, OSError) as e:
        print(f"hearth-bios-follow: grub unchanged: {e}", file=sys.stderr)
        return 1
    print(f"hearth-bios-follow: legacy BIOS boots now start version {me.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
