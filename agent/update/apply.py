"""Install a verified release with systemd-sysupdate, after the checks that make a failure harmless.

Refused up front, each with one clear line: a legacy BIOS boot (no boot counting, so no rollback), a
stick with the layout from before A/B updates, an ESP without room for the new UKI (systemd #39638:
a full ESP otherwise fails with an opaque I/O error).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from . import boot
from .boot import entries, require_uefi
from .fetch import store_dir
from .sums import Release, UpdateError

SYSUPDATE = "/usr/lib/systemd/systemd-sysupdate"
"""trixie ships systemd-sysupdate in systemd-container, outside $PATH."""
ESP = Path("/efi")
"""Where the image mounts its ESP (label HEARTH; /etc/fstab)."""
ESP_SLACK = 8 << 20
"""Room kept free on the ESP beyond the new UKI (FAT's own needs, the counter renames)."""

MIGRATION = (
    "this stick has the layout from before A/B updates (one root file system) and cannot update in place: "
    "reflash it with a new image (on another machine: sudo ci/flash hearth.raw /dev/sdX, or dd)"
)
MIGRATION_HINT = (
    "reflashing wipes the stick: first copy /var/lib/hearth (models, node identity, household) off its "
    "hearth-var partition, or join the household again with a code afterwards"
)


def require_ab_layout(os_release: Path = Path("/usr/lib/os-release"), root: Path = Path("/"),
                      usr: Path = Path("/usr")) -> str:
    """The running version, or UpdateError (reflash, and how) on a stick with the layout from before A/B.

    That layout had /usr inside the root file system and no IMAGE_VERSION; either gives it away.
    """
    current = boot.image_version(os_release)
    if current is None or os.stat(usr).st_dev == os.stat(root).st_dev:
        raise UpdateError(MIGRATION, hint=MIGRATION_HINT)
    return current


def preflight(release: Release, verified: Path, esp: Path = ESP, sys_firmware: Path = Path("/sys/firmware/efi"),
              os_release: Path = Path("/usr/lib/os-release"), root: Path = Path("/"), usr: Path = Path("/usr")) -> str:
    """Raise UpdateError unless this node can install *release*; returns the running version."""
    require_uefi(sys_firmware)
    current = require_ab_layout(os_release, root, usr)
    for e in entries(esp):
        if e.version == release.version and e.state == "bad":
            raise UpdateError(f"version {release.version} failed its health check on this node and was rolled back; "
                              "it is not installed again", hint="wait for a newer release ('hearth update check')")
        if e.version == release.version:
            raise UpdateError(f"version {release.version} is already installed ({e.state})",
                              hint="reboot to start it" if e.state == "trying" else None)
    uki = next(n for n in release.files if n.endswith(".efi"))
    need = (verified / uki).stat().st_size + ESP_SLACK
    try:
        free = shutil.disk_usage(esp).free
    except OSError:
        raise UpdateError(f"the ESP is not mounted at {esp}", hint="mount it (PARTLABEL=HEARTH) and retry") from None
    if free < need:
        raise UpdateError(f"the ESP has {free >> 20} MiB free; the new boot image needs {need >> 20} MiB",
                          hint=f"remove stray files from {esp} (keep EFI/ and loader/) and retry")
    return current


def install(release: Release, state_dir: Path, say: Callable[[str], None] = print,
            sysupdate: str = SYSUPDATE) -> None:
    """Write *release* from the verified store into the free slot and the ESP (systemd-sysupdate update)."""
    if not Path(sysupdate).exists() and not shutil.which(sysupdate):
        raise UpdateError("systemd-sysupdate is missing from this image", hint="install systemd-container")
    verified = store_dir(state_dir) / "verified"
    if not verified.is_dir():
        raise UpdateError("no verified update is stored", hint="run 'hearth update check' first")
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="info", LC_ALL="C")
    proc = subprocess.Popen([sysupdate, "update", release.version], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            tail = (tail + [line])[-8:]
            say(f"  sysupdate: {line}")
    if proc.wait() != 0:
        raise UpdateError(f"systemd-sysupdate failed ({proc.returncode}): {tail[-1] if tail else 'no output'}",
                          hint="the running version is untouched; 'hearth update apply' retries")
