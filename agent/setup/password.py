"""Admin password hashing: SHA-512 crypt (``$6$``), the format /etc/shadow and ``openssl passwd -6`` use;
checking also takes any method the system's libcrypt knows (yescrypt, after a ``passwd admin``).

Python 3.13 (the image's) has no ``crypt`` module, so the algorithm (Ulrich Drepper's "Unix crypt using
SHA-256 and SHA-512", the one glibc implements) is written out here; tests check it against openssl.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import secrets
import threading

_ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ROUNDS_DEFAULT = 5000
# The byte order SHA-512 crypt uses when it turns the 64-byte digest into 86 characters.
_ORDER = [(0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26), (6, 27, 48),
          (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32), (12, 33, 54), (34, 55, 13),
          (56, 14, 35), (15, 36, 57), (37, 58, 16), (59, 17, 38), (18, 39, 60), (40, 61, 19), (62, 20, 41)]


def _b64(b2: int, b1: int, b0: int, n: int) -> str:
    w = (b2 << 16) | (b1 << 8) | b0
    out = []
    for _ in range(n):
        out.append(_ITOA64[w & 0x3F])
        w >>= 6
    return "".join(out)


def _repeat(digest: bytes, length: int) -> bytes:
    return (digest * (length // len(digest) + 1))[:length]


def sha512_crypt(password: str, salt: str | None = None, rounds: int = _ROUNDS_DEFAULT) -> str:
    """The ``$6$salt$hash`` string for *password* (a random 16-character salt unless one is given)."""
    if salt is None:
        salt = "".join(secrets.choice(_ITOA64) for _ in range(16))
    pw = password.encode("utf-8")
    s = salt.encode("ascii")[:16]
    rounds = min(max(rounds, 1000), 999_999_999)
    b = hashlib.sha512(pw + s + pw).digest()
    a = hashlib.sha512(pw + s)
    a.update(_repeat(b, len(pw)))
    n = len(pw)
    while n:
        a.update(b if n & 1 else pw)
        n >>= 1
    c = a.digest()
    p = _repeat(hashlib.sha512(pw * len(pw)).digest(), len(pw))
    sb = _repeat(hashlib.sha512(s * (16 + c[0])).digest(), len(s))
    for i in range(rounds):
        x = hashlib.sha512(p if i & 1 else c)
        if i % 3:
            x.update(sb)
        if i % 7:
            x.update(p)
        x.update(c if i & 1 else p)
        c = x.digest()
    out = "".join(_b64(c[i], c[j], c[k], 4) for i, j, k in _ORDER) + _b64(0, 0, c[63], 2)
    prefix = "$6$" if rounds == _ROUNDS_DEFAULT else f"$6$rounds={rounds}$"
    return f"{prefix}{s.decode()}${out}"


_libcrypt: ctypes.CDLL | None = None
_libcrypt_lock = threading.Lock()
"""crypt() returns a static buffer: one call at a time."""


def _system_crypt(password: str, hashed: str) -> str | None:
    """*password* hashed with *hashed*'s method and salt by the system's libcrypt (libxcrypt: yescrypt, the
    hash trixie's ``passwd`` writes, and every other method /etc/shadow may hold); None without libcrypt."""
    global _libcrypt
    with _libcrypt_lock:
        if _libcrypt is None:
            name = ctypes.util.find_library("crypt") or "libcrypt.so.1"
            try:
                lib = ctypes.CDLL(name)
            except OSError:
                return None
            lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
            lib.crypt.restype = ctypes.c_char_p
            _libcrypt = lib
        out = _libcrypt.crypt(password.encode("utf-8"), hashed.encode("ascii", "replace"))
    return out.decode("ascii", "replace") if out else None


def verify(password: str, hashed: str) -> bool:
    """Whether *password* matches a crypt hash: ``$6$`` here, any other method (``$y$``: yescrypt, what
    ``passwd`` writes on trixie) through the system's libcrypt."""
    parts = hashed.split("$")
    if len(parts) < 4:
        return False
    if parts[1] != "6":
        got = _system_crypt(password, hashed)
        return got is not None and got.startswith("$") and secrets.compare_digest(got, hashed)
    rounds = _ROUNDS_DEFAULT
    salt = parts[2]
    if salt.startswith("rounds="):
        rounds, salt = int(salt[len("rounds="):]), parts[3]
    return secrets.compare_digest(sha512_crypt(password, salt, rounds), hashed)


def strength(password: str) -> tuple[str, str]:
    """A (word, hint) for the wizard: 'too short', 'weak', 'fair' or 'strong' and how to do better."""
    if len(password) < 8:
        return "too short", "use at least 8 characters"
    kinds = sum(any(f(c) for c in password) for f in (str.islower, str.isupper, str.isdigit))
    kinds += any(not c.isalnum() for c in password)
    if len(password) >= 16 or (len(password) >= 12 and kinds >= 3):
        return "strong", "good"
    if len(password) >= 10 and kinds >= 2:
        return "fair", "longer is stronger: a few unrelated words work well"
    return "weak", "add length: a few unrelated words, or mix digits and symbols"


def check_password(password: str, confirm: str) -> str | None:
    """What is wrong with a new admin password and its confirmation, or None."""
    if len(password) < 8:
        return "The password needs at least 8 characters."
    if password != confirm:
        return "The two passwords differ; type them again."
    return None
