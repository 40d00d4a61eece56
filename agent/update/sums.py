"""SHA256SUMS and its detached OpenPGP signature: parse, verify with gpgv, check files against them.

The signature is checked with gpgv (GnuPG's verify-only tool, the one systemd-sysupdate itself uses for
SHA256SUMS.gpg) against the keyring the image was built with; nothing here trusts a file before both the
signature and its hash are good.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import HearthError

SUMS = "SHA256SUMS"
"""The list of a release's files and their SHA-256."""
SIGNATURE = "SHA256SUMS.gpg"
"""The detached OpenPGP signature of SHA256SUMS."""
KEYRING = Path("/usr/lib/hearth/update-keyring.gpg")
"""The project's public key, baked into the image at build time (absent: this image cannot update)."""

_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *]([^/\\\s][^/\\]*)$")
_ARTIFACT = re.compile(
    r"^hearth_(?P<version>[A-Za-z0-9][A-Za-z0-9.~^_-]*?)"
    r"(?:\.efi|\.usr\.(?P<usr>[0-9a-f]{32})\.raw\.xz|\.usr-verity\.(?P<verity>[0-9a-f]{32})\.raw\.xz)$"
)


class UpdateError(HearthError):
    """An update cannot go ahead: bad or unsigned files, nothing to update from, a node that must not update."""


@dataclass(frozen=True)
class Release:
    """The three files of one version and their SHA-256, from a verified SHA256SUMS."""

    version: str
    files: dict[str, str]


def parse_sums(text: str) -> dict[str, str]:
    """File name -> sha256 from SHA256SUMS text (``sha256sum`` format); raises UpdateError on anything odd."""
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.match(line.rstrip("\r"))
        if not m:
            raise UpdateError(f"{SUMS} line {n} is not '<sha256>  <file name>'")
        digest, name = m.group(1).lower(), m.group(2)
        if name in out and out[name] != digest:
            raise UpdateError(f"{SUMS} lists {name} twice with different hashes")
        out[name] = digest
    if not out:
        raise UpdateError(f"{SUMS} is empty")
    return out


def releases(sums: dict[str, str]) -> dict[str, Release]:
    """Complete releases (UKI, usr, usr-verity) by version, from parsed SHA256SUMS; other files are ignored."""
    found: dict[str, dict[str, str]] = {}
    for name, digest in sums.items():
        m = _ARTIFACT.match(name)
        if m:
            found.setdefault(m.group("version"), {})[name] = digest
    out = {}
    for version, files in found.items():
        kinds = {("efi" if f.endswith(".efi") else "verity" if ".usr-verity." in f else "usr") for f in files}
        if kinds == {"efi", "usr", "verity"} and len(files) == 3:
            out[version] = Release(version, files)
    return out


def verify_signature(sums: Path, signature: Path, keyring: Path | None = None) -> None:
    """Raise UpdateError unless *signature* is a good signature of *sums* by a key in *keyring* (gpgv).

    *keyring* defaults to the image's KEYRING."""
    keyring = keyring or KEYRING
    if not keyring.is_file():
        raise UpdateError(f"this image has no update key ({keyring})",
                          hint="it was built without HEARTH_UPDATE_KEY; reflash with a release image to get updates")
    gpgv = shutil.which("gpgv")
    if gpgv is None:
        raise UpdateError("gpgv is missing: cannot check the update's signature", hint="install the gpgv package")
    if not signature.is_file():
        raise UpdateError(f"the update has no signature ({signature.name})")
    env = dict(os.environ, LC_ALL="C")
    try:
        proc = subprocess.run([gpgv, "--status-fd", "1", "--keyring", str(keyring), str(signature), str(sums)],
                              capture_output=True, text=True, timeout=60, env=env, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UpdateError(f"gpgv did not run: {e}") from None
    status = proc.stdout.splitlines()
    # gpgv exits 0 only for a good signature by a key in the keyring; VALIDSIG says which key made it.
    if proc.returncode != 0 or not any(s.startswith("[GNUPG:] VALIDSIG ") for s in status):
        why = "bad signature" if any(s.startswith("[GNUPG:] BADSIG") for s in status) else \
              "signed by an unknown key" if any(s.startswith("[GNUPG:] NO_PUBKEY") for s in status) else \
              "not a valid signature"
        raise UpdateError(f"{sums.name}: {why}; the update is refused",
                          hint="the files may have been changed on the way; ask the publisher")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_file(path: Path, digest: str) -> None:
    """Raise UpdateError unless *path*'s SHA-256 is *digest*."""
    got = sha256_file(path)
    if got != digest:
        raise UpdateError(f"{path.name}: SHA-256 {got[:12]}... is not the signed {digest[:12]}...; the file is refused",
                          hint="it was changed or cut short; 'hearth update apply' fetches it again")


def load_verified(directory: Path, keyring: Path | None = None) -> dict[str, str]:
    """Parsed SHA256SUMS of *directory* after checking its signature."""
    verify_signature(directory / SUMS, directory / SIGNATURE, keyring)
    return parse_sums((directory / SUMS).read_text(encoding="utf-8", errors="replace"))
