"""The built image carries no identity and no secrets: two sticks flashed from it are two nodes.

Every file system of the image is mounted read-only from a loop device and inspected offline.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

# A PEM/OpenSSH private key with its body (programs carry the bare header as a string constant).
PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )?PRIVATE KEY-----\r?\n(?:[A-Za-z0-9:, -]+\r?\n)*[A-Za-z0-9+/=]{48,}")
API_KEY = re.compile(rb"hearth-[A-Za-z0-9_-]{40,}")
SCAN_LIMIT = 8 << 20
# Known test fixtures inside third-party wheels (not keys of this node or of anyone's household), and
# GnuTLS's built-in self-test keys (public known-answer vectors; systemd-container's importer links it).
ALLOWED_KEY_FILES = re.compile(r"/site-packages/.*/tests?/|/usr/share/doc/|/libgnutls\.so[.0-9]*$")


def files(top: Path) -> Iterator[Path]:
    """Regular files under top (no symlinks followed)."""
    for dirpath, _dirs, names in os.walk(top):
        for name in names:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path


def test_machine_id_uninitialised(fs):
    machine_id = (fs["root"] / "etc/machine-id").read_text().strip()
    assert machine_id in ("", "uninitialized"), f"baked machine-id {machine_id!r}"
    for stale in ("lib/dbus/machine-id", "lib/systemd/random-seed", "lib/systemd/credential.secret"):
        path = fs["var"] / stale
        assert not path.exists() or path.is_symlink(), f"/var/{stale} is baked into the image"


def test_no_ssh_host_keys(fs):
    assert not list((fs["root"] / "etc/ssh").glob("ssh_host_*")), "SSH host keys are baked into the image"


def test_no_passwords(fs):
    for line in (fs["root"] / "etc/shadow").read_text().splitlines():
        user, hashed = line.split(":")[:2]
        assert not hashed.startswith("$") and hashed.lstrip("!") in ("", "*"), f"{user} has a password hash"
        if user == "root":
            assert hashed.startswith(("!", "*")), "root must be locked (no password login)"
    # mkosi stores locale/keymap/timezone as credentials; no password may be among them.
    credstore = fs["root"] / "usr/lib/credstore"
    baked = [p.name for p in credstore.iterdir()] if credstore.exists() else []
    assert not [n for n in baked if n.startswith("passwd.") or "password" in n], f"password credentials: {baked}"


def test_no_hearth_state_or_config(fs):
    assert not (fs["root"] / "etc/hearth/hearth.yaml").exists(), "the image must boot unconfigured"
    state = fs["var"] / "lib/hearth"
    leftovers = [p for p in files(state)] if state.exists() else []
    assert not leftovers, f"node state baked into the image: {leftovers}"
    assert not (fs["esp"] / "hearth.yaml").exists(), "a preset is baked onto the FAT partition"


def test_no_private_or_api_keys(fs):
    hits = []
    for top in fs.values():
        for path in files(top):
            rel = "/" + str(path.relative_to(top))
            if rel.startswith(("/usr/lib/modules", "/usr/share/hearth/models", "/usr/lib/firmware")):
                continue
            try:
                if path.stat().st_size > SCAN_LIMIT:
                    continue
                data = path.read_bytes()
            except OSError:
                continue
            if PRIVATE_KEY.search(data) and not ALLOWED_KEY_FILES.search(rel):
                hits.append(f"private key in {rel}")
            if API_KEY.search(data) and "/site-packages/hearth" not in rel:
                hits.append(f"API-key-like string in {rel}")
    assert not hits, "\n".join(hits)
