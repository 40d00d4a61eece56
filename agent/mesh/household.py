"""The household: a random 256-bit secret made on one node and carried to others by a join code.

A join code is the secret in Crockford base32 (no I, L, O or U, so it reads aloud and types without
ambiguity) plus a 20-bit checksum, in groups of four after ``HRTH``:
``HRTH-XXXX-XXXX-...-CCCC``. A mistyped code is caught here, before any network traffic. These functions
are what the first-boot wizard calls; they import nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..errors import HearthError
from ..fsutil import atomic_write

HOUSEHOLD_FILE = "household.json"
SECRET_BYTES = 32
PREFIX = "HRTH"
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
"""Crockford's base32 alphabet."""
_DECODE = {c: i for i, c in enumerate(ALPHABET)} | {"O": 0, "I": 1, "L": 1}
_SECRET_CHARS = 52  # ceil(256 / 5)
_CHECK_CHARS = 4  # 20 bits: a typo slips through about once in a million
_CODE_CHARS = _SECRET_CHARS + _CHECK_CHARS


class HouseholdError(HearthError):
    """The household file is missing or damaged, or an operation needs a household first."""


class InvalidCode(HouseholdError):
    """A join code is malformed or fails its checksum (a typo)."""

    exit_code = 2


@dataclass(frozen=True)
class Household:
    """The household this node belongs to."""

    secret: bytes

    @property
    def id(self) -> str:
        """A short public name for the household (a hash of the secret; it reveals nothing of it)."""
        return hashlib.sha256(b"hearth-household-id" + self.secret).hexdigest()[:12]


def _encode(n: int, chars: int) -> str:
    out = []
    for _ in range(chars):
        out.append(ALPHABET[n & 31])
        n >>= 5
    return "".join(reversed(out))


def _checksum(secret: bytes) -> str:
    digest = int.from_bytes(hashlib.sha256(b"hearth-join-v1" + secret).digest()[:3], "big") >> 4
    return _encode(digest, _CHECK_CHARS)


def code_for(secret: bytes) -> str:
    """The join code for *secret*."""
    body = _encode(int.from_bytes(secret, "big") << 4, _SECRET_CHARS) + _checksum(secret)
    groups = [body[i:i + 4] for i in range(0, len(body), 4)]
    return "-".join([PREFIX, *groups])


def verify_code(code: str) -> bytes:
    """The secret a join code carries; raises InvalidCode (with what is wrong) for a malformed or mistyped code."""
    text = "".join(code.split()).upper().replace("-", "")
    if text.startswith(PREFIX):
        text = text[len(PREFIX):]
    bad = sorted({c for c in text if c not in _DECODE})
    if bad:
        raise InvalidCode(f"the join code has characters that are never in a code: {' '.join(bad)}",
                          hint="codes use digits and letters except I, L, O and U; copy it again from 'hearth household invite'")
    if len(text) != _CODE_CHARS:
        raise InvalidCode(f"the join code has {len(text)} characters after HRTH, a code has {_CODE_CHARS}",
                          hint="check for a missing or doubled group of four")
    n = 0
    for c in text[:_SECRET_CHARS]:
        n = (n << 5) | _DECODE[c]
    if n & 0xF:
        raise InvalidCode("the join code is mistyped (its checksum does not match)", hint="compare it group by group")
    secret = (n >> 4).to_bytes(SECRET_BYTES, "big")
    check = "".join(ALPHABET[_DECODE[c]] for c in text[_SECRET_CHARS:])
    if check != _checksum(secret):
        raise InvalidCode("the join code is mistyped (its checksum does not match)", hint="compare it group by group")
    return secret


def path_of(state_dir: str | os.PathLike[str]) -> Path:
    """Where the household secret is kept."""
    return Path(state_dir) / HOUSEHOLD_FILE


def load(state_dir: str | os.PathLike[str]) -> Household | None:
    """This node's household, or None when it has not created or joined one."""
    path = path_of(state_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Household(bytes.fromhex(data["secret"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HouseholdError(f"the household file {path} is damaged ({e})",
                             hint="join again with 'hearth household join CODE'") from None


def _store(state_dir: str | os.PathLike[str], secret: bytes) -> Household:
    household = Household(secret)
    data = {"version": 1, "secret": secret.hex(), "id": household.id}
    atomic_write(path_of(state_dir), json.dumps(data) + "\n", mode=0o600)
    return household


def create(state_dir: str | os.PathLike[str], force: bool = False) -> Household:
    """Make a new household with a random 256-bit secret; refuses to replace one unless *force*."""
    if not force and load(state_dir) is not None:
        raise HouseholdError("this node already belongs to a household",
                             hint="'hearth household invite' shows its join code; --force makes a new one")
    return _store(state_dir, secrets.token_bytes(SECRET_BYTES))


def invite(state_dir: str | os.PathLike[str]) -> str:
    """The join code of this node's household."""
    household = load(state_dir)
    if household is None:
        raise HouseholdError("this node has no household yet",
                             hint="'hearth household create' makes one, 'hearth household join CODE' joins one")
    return code_for(household.secret)


def join(state_dir: str | os.PathLike[str], code: str, force: bool = False) -> Household:
    """Check *code* locally and store its secret; refuses to switch households unless *force*."""
    secret = verify_code(code)
    current = load(state_dir)
    if current is not None and current.secret != secret and not force:
        raise HouseholdError("this node already belongs to another household",
                             hint="add --force to leave it and join this one")
    return _store(state_dir, secret)


def check_code_with_peer(code: str, peer_url: str, timeout: float = 5.0) -> bool:
    """Prove *code* against a live peer (signed challenge and signed answer); False when the peer says it is wrong.

    Raises InvalidCode for a mistyped code (no traffic) and HouseholdError when the peer cannot be reached.
    """
    from .client import hello_with_secret  # httpx only when the network is really used

    return hello_with_secret(verify_code(code), peer_url, timeout=timeout) is not None


def join_via_peer(state_dir: str | os.PathLike[str], code: str, peer_url: str, force: bool = False) -> Household:
    """Check *code* live against *peer_url*, then join; raises InvalidCode when the peer refuses it."""
    if not check_code_with_peer(code, peer_url):
        raise InvalidCode(f"the node at {peer_url} does not accept this join code",
                          hint="show the code again on a node of the household with 'hearth household invite'")
    return join(state_dir, code, force=force)
