"""The household's TLS credentials: a CA derived from the household secret, and node certificates on node keys.

Every member derives the same household CA key (Ed25519, HKDF-SHA256 from the secret), so the CA needs
no distribution and no file: a node issues its own certificate at start, for its own Ed25519 node key,
with its node id as subject and SAN. Both ends of a connection require a certificate from the household
CA (mutual TLS 1.3 only, session tickets off so every connection authenticates in full), and the side
that dials checks that the certificate's key is the node id it meant to reach. Another household's node
holds another CA, so its handshake fails both ways before a byte of a request moves.

The certificate and key reach OpenSSL through an anonymous memory file (memfd): nothing secret is written
to disk beyond the node identity that already is.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from ..errors import HearthError
from .household import Household
from .identity import Identity, node_id_of

# A household CA and its certificates never expire on a date: home PCs often boot with a wrong clock
# (a flat CMOS battery), and membership ends by changing the household secret, not by a calendar.
_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


class ChannelError(HearthError):
    """The household channel cannot be set up or used."""


def household_ca_key(household: Household) -> Ed25519PrivateKey:
    """The household CA's Ed25519 key, the same on every member (HKDF-SHA256 of the secret)."""
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"hearth-household",
                info=b"hearth mesh v2 household CA").derive(household.secret)
    return Ed25519PrivateKey.from_private_bytes(seed)


def _ca_name(household: Household) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Hearth"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"hearth household {household.id}")])


def household_ca(household: Household) -> x509.Certificate:
    """The household CA certificate (byte-identical on every member: fixed fields, deterministic Ed25519)."""
    key = household_ca_key(household)
    name = _ca_name(household)
    public = key.public_key()
    serial = int.from_bytes(hashlib.sha256(b"hearth-ca" + household.id.encode()).digest()[:16], "big") >> 1
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
            .serial_number(serial).not_valid_before(_NOT_BEFORE).not_valid_after(_NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, None))


def node_certificate(identity: Identity, household: Household) -> x509.Certificate:
    """A certificate for this node's own Ed25519 key, issued by the household CA; subject and SAN name the node."""
    ca_key = household_ca_key(household)
    public = identity.private_key.public_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Hearth"),
                      x509.NameAttribute(NameOID.COMMON_NAME, identity.node_id)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(_ca_name(household)).public_key(public)
            .serial_number(x509.random_serial_number()).not_valid_before(_NOT_BEFORE).not_valid_after(_NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"{identity.node_id}.hearth")]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, None))


def node_id_of_certificate(der: bytes | None) -> str:
    """The node id an Ed25519 certificate (DER) belongs to; '' for none or another kind of key."""
    if not der:
        return ""
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except ValueError:
        return ""
    if not isinstance(key, Ed25519PublicKey):
        return ""
    return node_id_of(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def peer_node_id(ssl_object: Any) -> str:
    """The node id of the peer on a TLS connection (an ssl.SSLObject or SSLSocket); '' when there is none."""
    if ssl_object is None:
        return ""
    return node_id_of_certificate(ssl_object.getpeercert(binary_form=True))


@contextlib.contextmanager
def _pem_path(pem: bytes) -> Any:
    """A path OpenSSL can read *pem* from: an anonymous memory file, or a private temporary file as a fallback."""
    try:
        fd = os.memfd_create("hearth-node-cert", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        try:
            os.write(fd, pem)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="hearth-tls-") as tmp:
        path = os.path.join(tmp, "node.pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(pem)
        yield path


@dataclass(frozen=True)
class Credentials:
    """What this node shows and trusts on the channel: its certificate, its key and the household CA."""

    identity: Identity
    household: Household
    certificate: x509.Certificate
    ca: x509.Certificate

    @classmethod
    def issue(cls, identity: Identity, household: Household) -> Credentials:
        """Derive the household CA and issue this node's certificate (a few milliseconds; nothing on disk)."""
        return cls(identity, household, node_certificate(identity, household), household_ca(household))

    @property
    def node_id(self) -> str:
        """This node's id (the certificate's subject)."""
        return self.identity.node_id

    def context(self, server: bool, alpn: list[str] | None = None) -> ssl.SSLContext:
        """A TLS 1.3-only context that shows this node's certificate and requires one from the household CA."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        if not server:
            ctx.check_hostname = False  # the dialler checks the node id in the certificate instead
        else:
            ctx.num_tickets = 0  # no resumption: every connection proves its certificate again
        ctx.load_verify_locations(cadata=self.ca.public_bytes(serialization.Encoding.DER))
        pem = (self.certificate.public_bytes(serialization.Encoding.PEM)
               + self.identity.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
        try:
            with _pem_path(pem) as path:
                ctx.load_cert_chain(path)
        except (ssl.SSLError, OSError) as e:
            raise ChannelError(f"cannot load this node's channel certificate: {e}",
                               hint="this OpenSSL may lack Ed25519 in TLS 1.3 (needs OpenSSL 1.1.1 or newer)") from None
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx
