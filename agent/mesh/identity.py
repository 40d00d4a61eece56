"""A node's identity: an Ed25519 key pair made on first start and kept under <state>/identity.

The node id is derived from the public key, so two sticks flashed from one image (no key yet) become
two nodes, and a copied identity shows up as two nodes claiming one id, which the mesh refuses.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import HearthError
from ..fsutil import atomic_write

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity"


class IdentityError(HearthError):
    """The identity file exists but cannot be used."""


def node_id_of(public_key: bytes) -> str:
    """The node id for a raw Ed25519 public key: the first 8 bytes of its SHA-256, in hex."""
    return hashlib.sha256(public_key).digest()[:8].hex()


def fingerprint_of(public_key: bytes) -> str:
    """The key fingerprint announced in mDNS TXT (public, not secret): 16 bytes of SHA-256, hex."""
    return hashlib.sha256(b"hearth-key" + public_key).digest()[:16].hex()


@dataclass(frozen=True)
class Identity:
    """This node's key pair and the names derived from it."""

    private_key: Ed25519PrivateKey

    @property
    def public_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def node_id(self) -> str:
        """The node id (16 hex digits)."""
        return node_id_of(self.public_bytes)

    @property
    def fingerprint(self) -> str:
        """The public key's fingerprint."""
        return fingerprint_of(self.public_bytes)

    @property
    def default_name(self) -> str:
        """hearth-xxxx, used when the config names no node."""
        return f"hearth-{self.node_id[:4]}"

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature over *data*."""
        return self.private_key.sign(data)


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Whether *signature* is *public_key*'s Ed25519 signature over *data*."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def load_or_create(state_dir: str | os.PathLike[str]) -> Identity:
    """The node's identity from <state>/identity, made (0600, atomically) on first start."""
    path = Path(state_dir) / IDENTITY_FILE
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        atomic_write(path, pem, mode=0o600)
        ident = Identity(key)
        log.info("made a new node identity %s", ident.node_id)
        return ident
    except OSError as e:
        raise IdentityError(f"cannot read the node identity {path}: {e}", hint="check the state directory's permissions") from None
    try:
        loaded = serialization.load_pem_private_key(pem, password=None)
    except ValueError:
        raise IdentityError(f"the node identity {path} is damaged",
                            hint="remove it to make a new identity (peers will see a new node)") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise IdentityError(f"the node identity {path} is not an Ed25519 key", hint="remove it to make a new one")
    return Identity(loaded)
