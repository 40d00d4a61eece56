"""Signing in to the household page: the admin password, sessions, CSRF tokens and the login rate limit.

The password is the admin account's, set in the wizard and stored as a SHA-512 crypt hash in /etc/shadow.
The agent runs as its own user and cannot read /etc/shadow, so setup copies the hash into the agent's
state directory (``admin-password``, 0600); as root the agent also reads /etc/shadow directly.

Sessions live in memory (a restart signs everyone out, which is fine for a LAN appliance) and are
looked up by the SHA-256 of their token, so the table holds nothing a memory dump could replay as a
cookie. This module imports nothing heavy: the wizard's setup step calls it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..fsutil import atomic_open
from ..setup import password as pw

PASSWORD_FILE = "admin-password"
COOKIE = "hearth_session"
SESSION_SECONDS = 7 * 24 * 3600
"""A session ends a week after its last use."""
MAX_SESSIONS = 256
"""Beyond this the oldest session is dropped (each successful sign-in makes one)."""


def password_path(state_dir: str | os.PathLike[str]) -> Path:
    """Where the agent keeps its copy of the admin password hash."""
    return Path(state_dir) / PASSWORD_FILE


def store_password_hash(state_dir: str | os.PathLike[str], hashed: str) -> None:
    """Keep *hashed* (a crypt hash: ``$6$``, ``$y$``) for the page's sign-in, atomically, readable by its owner only."""
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    owner = Path(state_dir).stat()
    with atomic_open(password_path(state_dir), mode=0o600) as f:
        if os.geteuid() == 0 and owner.st_uid != 0:
            # Run as root while the agent runs (after 'passwd admin'): the agent's user must read the new copy.
            os.fchown(f.fileno(), owner.st_uid, owner.st_gid)
        f.write(hashed.strip() + "\n")


def _shadow_hash(root: Path) -> str | None:
    try:
        lines = (root / "etc/shadow").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None  # not root, or no shadow file: the state copy is what counts
    for line in lines:
        fields = line.split(":")
        if fields[0] == "admin" and len(fields) > 1:
            return fields[1] if fields[1].startswith("$") else ""  # "!", "*" or "": locked or no password
    return ""  # no admin account: no password


def copy_from_shadow(root: Path, state_dir: str | os.PathLike[str]) -> str:
    """Copy admin's hash from *root*/etc/shadow into *state_dir* (already under *root*): the setup step, and
    ``hearth setup page-password`` after every change of /etc/shadow. A locked or removed admin password
    removes the copy, so the page never takes a password the system no longer does; a shadow file that
    cannot be read (not root) changes nothing."""
    hashed = _shadow_hash(Path(root))
    if hashed is None and password_path(state_dir).is_file():
        return f"cannot read {Path(root) / 'etc/shadow'}: the page keeps the admin password it had"
    if not hashed:
        with contextlib.suppress(FileNotFoundError):
            password_path(state_dir).unlink()
        return "no admin password: the household page signs in from this machine only"
    store_password_hash(state_dir, hashed)
    return "page sign-in uses the admin password"


def load_password_hash(state_dir: str | os.PathLike[str], root: Path = Path("/")) -> str | None:
    """The admin's hash: the state directory's copy, else /etc/shadow when readable; None when unset."""
    try:
        text = password_path(state_dir).read_text(encoding="utf-8").strip()
        if text.startswith("$"):
            return text
    except (OSError, UnicodeDecodeError):
        pass
    return _shadow_hash(root) or None


def check_password(candidate: str, hashed: str | None) -> bool:
    """Whether *candidate* is the admin password (False when none is set)."""
    if not hashed or not candidate:
        return False
    try:
        return pw.verify(candidate, hashed)
    except (ValueError, IndexError):
        return False


@dataclass
class Session:
    """One signed-in browser."""

    csrf: str
    """Sent back by the page in X-Hearth-CSRF on every change; a cross-site page cannot read it."""
    expires: float


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


@dataclass
class Sessions:
    """The signed-in browsers, by the hash of their cookie."""

    ttl: float = SESSION_SECONDS
    _by_digest: dict[str, Session] = field(default_factory=dict)

    def create(self) -> tuple[str, Session]:
        """A new session: (the cookie's token, the session)."""
        now = time.time()
        self._by_digest = {d: s for d, s in self._by_digest.items() if s.expires > now}
        while len(self._by_digest) >= MAX_SESSIONS:
            oldest = min(self._by_digest, key=lambda d: self._by_digest[d].expires)
            del self._by_digest[oldest]
        token = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(24), expires=now + self.ttl)
        self._by_digest[_digest(token)] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        """The live session for *token* (its expiry pushed on), or None."""
        if not token:
            return None
        key = _digest(token)
        session = self._by_digest.get(key)
        if session is None:
            return None
        now = time.time()
        if session.expires <= now:
            del self._by_digest[key]
            return None
        session.expires = now + self.ttl
        return session

    def drop(self, token: str | None) -> None:
        """Sign *token* out."""
        if token:
            self._by_digest.pop(_digest(token), None)


@dataclass
class LoginLimiter:
    """Failed sign-ins: at most *per_address* per *window* seconds from one address, and *overall* from all."""

    per_address: int = 5
    overall: int = 30
    window: float = 60.0
    _failures: dict[str, deque[float]] = field(default_factory=dict)
    _all: deque[float] = field(default_factory=deque)

    def _trim(self, q: deque[float], now: float) -> None:
        while q and q[0] <= now - self.window:
            q.popleft()

    def retry_after(self, address: str) -> int:
        """Seconds until *address* may try again; 0 when it may now."""
        now = time.monotonic()
        self._trim(self._all, now)
        q = self._failures.get(address)
        if q is not None:
            self._trim(q, now)
        waits = []
        if q is not None and len(q) >= self.per_address:
            waits.append(q[0] + self.window - now)
        if len(self._all) >= self.overall:
            waits.append(self._all[0] + self.window - now)
        return max(1, int(max(waits) + 0.999)) if waits else 0

    def failed(self, address: str) -> None:
        """Count a failed sign-in from *address*."""
        now = time.monotonic()
        if len(self._failures) > 4096:
            self._failures.clear()
        self._failures.setdefault(address, deque()).append(now)
        self._all.append(now)

    def succeeded(self, address: str) -> None:
        """Forget *address*'s failures."""
        self._failures.pop(address, None)
