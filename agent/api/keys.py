"""API keys: made on the node's first start, kept in ``<state_dir>/api-keys`` (0600), checked in constant time.

Keys are stored in plain text in a file only root (the agent's user) can read, like SSH host keys: the
console and ``hearth apikey show`` must be able to show the household its key after first boot, which a
hash could not. Comparison hashes both sides and compares digests with ``hmac.compare_digest`` over every
key, so neither a key's content nor which key matched shows in timing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import HearthError
from ..fsutil import atomic_write

log = logging.getLogger(__name__)

PREFIX = "hearth-"
DEFAULT_NAME = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ApiKeyError(HearthError):
    """A key operation failed (bad name, unknown key, unreadable file)."""


@dataclass(frozen=True)
class ApiKey:
    """One named key."""

    name: str
    key: str
    created: float

    @property
    def shown(self) -> str:
        """The key with its secret part masked, for listings."""
        return self.key[: len(PREFIX) + 4] + "…" + self.key[-4:]


def new_key() -> str:
    """A fresh key: 'hearth-' and 32 random bytes, URL-safe."""
    return PREFIX + secrets.token_urlsafe(32)


class KeyStore:
    """The node's API keys in one JSON file, re-read when it changes (so ``hearth apikey`` needs no restart)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._keys: list[ApiKey] = []
        self._digests: list[bytes] = []
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0

    # --- reading ------------------------------------------------------------------------------------

    def load(self) -> list[ApiKey]:
        """Every key in the file (none when the file does not exist)."""
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except PermissionError:
            raise ApiKeyError(f"cannot read {self.path}: permission denied",
                            hint="run it as root: sudo hearth apikey") from None
        except OSError as e:
            raise ApiKeyError(f"cannot read {self.path}: {e.strerror}") from None
        try:
            data = json.loads(raw)
            return [ApiKey(str(k["name"]), str(k["key"]), float(k.get("created", 0))) for k in data["keys"]]
        except (ValueError, KeyError, TypeError):
            raise ApiKeyError(f"{self.path} is damaged", hint=f"move it away and restart the agent to make a new key: "
                                                           f"mv {self.path} {self.path}.bad") from None

    def _refresh(self) -> None:
        # A stat at most once a second keeps the check cheap and picks up `hearth apikey` edits.
        now = time.monotonic()
        if now - self._checked < 1.0 and self._stamp is not None:
            return
        self._checked = now
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_ino)
        except OSError:
            stamp = (0, 0)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._keys = self.load()
        except ApiKeyError as e:
            log.error("API keys unreadable, refusing every key: %s", e.message)
            self._keys = []
        self._digests = [hashlib.sha256(k.key.encode()).digest() for k in self._keys]

    def check(self, presented: str) -> bool:
        """Whether *presented* is a current key (constant time in the key's content)."""
        self._refresh()
        digest = hashlib.sha256(presented.encode("utf-8", "replace")).digest()
        ok = False
        for known in self._digests:
            ok |= hmac.compare_digest(digest, known)
        return ok

    # --- changing -----------------------------------------------------------------------------------

    def _save(self, keys: list[ApiKey]) -> None:
        data = {"keys": [{"name": k.name, "key": k.key, "created": k.created} for k in keys]}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(data, indent=2) + "\n", mode=0o600)
        except PermissionError:
            raise ApiKeyError(f"cannot write {self.path}: permission denied",
                            hint="run it as root: sudo hearth apikey") from None
        except OSError as e:
            raise ApiKeyError(f"cannot write {self.path}: {e.strerror}") from None
        self._stamp = None

    def ensure_default(self) -> ApiKey | None:
        """Make the 'default' key on first start; returns it when it was just made."""
        if self.path.exists():
            return None
        key = ApiKey(DEFAULT_NAME, new_key(), time.time())
        self._save([key])
        log.info("made the first API key '%s' in %s", DEFAULT_NAME, self.path)
        return key

    def create(self, name: str) -> ApiKey:
        """Add a key named *name* (names are unique)."""
        if not _NAME.match(name):
            raise ApiKeyError(f"bad key name {name!r}", hint="use up to 64 letters, digits, '.', '_' or '-'")
        keys = self.load()
        if any(k.name == name for k in keys):
            raise ApiKeyError(f"a key named '{name}' exists", hint=f"revoke it first: hearth apikey revoke {name}")
        key = ApiKey(name, new_key(), time.time())
        self._save([*keys, key])
        return key

    def revoke(self, name: str) -> None:
        """Remove the key named *name*."""
        keys = self.load()
        kept = [k for k in keys if k.name != name]
        if len(kept) == len(keys):
            raise ApiKeyError(f"no key named '{name}'", hint="hearth apikey list shows the keys")
        self._save(kept)

    def get(self, name: str) -> ApiKey:
        """The key named *name*."""
        for k in self.load():
            if k.name == name:
                return k
        raise ApiKeyError(f"no key named '{name}'", hint="hearth apikey list shows the keys; "
                        "the agent makes 'default' on its first start")


def keys_path(state_dir: str | os.PathLike[str]) -> Path:
    """Where a node keeps its API keys."""
    return Path(state_dir) / "api-keys"
