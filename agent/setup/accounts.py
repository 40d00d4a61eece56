"""The ``admin`` account in /etc/passwd, /etc/group and /etc/shadow under a root directory.

The password is stored only as a SHA-512 crypt hash. The files are edited line by line and written
atomically, keeping every other account as it was; an offline root (the tests', an image) works too.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from ..fsutil import atomic_write
from . import password as pw

ADMIN = "admin"
ADMIN_GROUPS = ("sudo", "adm", "systemd-journal")
"""Groups admin joins where the image has them: sudo for root, the others to read logs."""


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []


def _write(path: Path, lines: list[str], default_mode: int) -> bool:
    text = "\n".join(lines) + "\n"
    try:
        st = path.stat()
        if path.read_text(encoding="utf-8") == text:
            return False
        mode, owner = st.st_mode & 0o777, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = default_mode, None
    atomic_write(path, text, mode=mode)
    if owner and os.geteuid() == 0:
        os.chown(path, *owner)  # /etc/shadow is root:shadow on Debian; keep it so
    return True


def _entry(lines: list[str], name: str) -> list[str] | None:
    for line in lines:
        fields = line.split(":")
        if fields[0] == name:
            return fields
    return None


def admin_ids(root: Path) -> tuple[int, int] | None:
    """(uid, gid) of admin under *root*, or None when there is no such user."""
    fields = _entry(_read_lines(root / "etc/passwd"), ADMIN)
    return (int(fields[2]), int(fields[3])) if fields and len(fields) > 3 else None


def home_of(root: Path) -> Path:
    """admin's home directory under *root*."""
    fields = _entry(_read_lines(root / "etc/passwd"), ADMIN)
    home = fields[5] if fields and len(fields) > 5 and fields[5].startswith("/") else f"/home/{ADMIN}"
    return root / home.lstrip("/")


def chown_admin(root: Path, *paths: Path) -> None:
    """Give *paths* to admin (sshd refuses keys in files others own); a no-op when not root."""
    ids = admin_ids(root)
    if ids and os.geteuid() == 0:
        for p in paths:
            with contextlib.suppress(OSError):
                os.chown(p, *ids)


def _free_id(lines: list[str], start: int = 1000) -> int:
    used = {int(f[2]) for f in (ln.split(":") for ln in lines) if len(f) > 2 and f[2].isdigit()}
    n = start
    while n in used:
        n += 1
    return n


def ensure_admin(root: Path) -> tuple[int, int]:
    """Create the admin user and group if the image has none (sysusers may already have made them)."""
    etc = root / "etc"
    passwd, group = _read_lines(etc / "passwd"), _read_lines(etc / "group")
    ids = admin_ids(root)
    if ids is None:
        gfields = _entry(group, ADMIN)
        uid = _free_id(passwd)
        gid = int(gfields[2]) if gfields else _free_id(group, uid)
        passwd.append(f"{ADMIN}:x:{uid}:{gid}:Hearth admin:/home/{ADMIN}:/bin/bash")
        _write(etc / "passwd", passwd, 0o644)
        ids = (uid, gid)
    if _entry(group, ADMIN) is None:
        group.append(f"{ADMIN}:x:{ids[1]}:")
    for i, line in enumerate(group):
        f = line.split(":")
        if len(f) == 4 and f[0] in ADMIN_GROUPS:
            members = [m for m in f[3].split(",") if m]
            if ADMIN not in members:
                f[3] = ",".join([*members, ADMIN])
                group[i] = ":".join(f)
    _write(etc / "group", group, 0o644)
    home = home_of(root)
    if not home.exists():
        home.mkdir(parents=True, mode=0o700)
        chown_admin(root, home)
    return ids


def set_admin(root: Path, password: str, password_hash: str = "") -> str:
    """Create admin if needed and set its password hash in /etc/shadow (locked when none is given)."""
    ensure_admin(root)
    shadow_path = root / "etc/shadow"
    shadow = _read_lines(shadow_path)
    current = _entry(shadow, ADMIN)
    if password:
        # Keep the old hash when it already matches: re-running apply changes nothing.
        if current and len(current) > 1 and pw.verify(password, current[1]):
            new_hash = current[1]
        else:
            new_hash = pw.sha512_crypt(password)
    elif password_hash:
        new_hash = password_hash
    else:
        new_hash = current[1] if current and len(current) > 1 else "!"
    days = str(int(time.time()) // 86400)  # last password change, in days since 1970
    if current is None:
        shadow.append(f"{ADMIN}:{new_hash}:{days}:0:99999:7:::")
    else:
        current[1] = new_hash
        shadow = [":".join(current) if ln.split(":")[0] == ADMIN else ln for ln in shadow]
    _write(shadow_path, shadow, 0o640)
    return "password set" if new_hash not in ("!", "*", "") else "no password (console login off)"
