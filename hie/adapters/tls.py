"""TLS for the hub's own listeners (MLLP, DICOM): the server context and the client
certificate a peer presented.

A peer that presents a verified client certificate is known by its SHA-256 fingerprint: the
facility registry lists the fingerprints of each MO's systems on their Endpoints
(:data:`hie.registries.facility.CERTIFICATE_SYSTEM`), and the listeners check that the MO a
connection names is the one the certificate belongs to.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass, field

from cryptography import x509


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """The verified TLS client certificate of a peer."""

    subject: dict[str, str] = field(hash=False)  # RDN short names: {"CN": …, "O": …}
    sha256: str  # fingerprint of the DER certificate, lower-case hex


def server_ssl_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """A TLS server context (TLS 1.2 or newer) for the PEM certificate chain ``cert`` and its
    ``key`` (empty: the key is in ``cert``). With ``client_ca`` every client must present a
    certificate that chains to one of the CAs in that PEM bundle."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key or None)
    if client_ca:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_certificate(der: bytes) -> PeerCertificate:
    """The subject (RFC 4514 short names; an attribute without one, such as the Russian ОГРН
    1.2.643.100.1, under its dotted OID; repeated attributes joined by ", ") and SHA-256
    fingerprint of a DER certificate."""
    subject: dict[str, str] = {}
    for attr in x509.load_der_x509_certificate(der).subject:
        name = attr.rfc4514_attribute_name
        value = attr.value if isinstance(attr.value, str) else attr.value.hex()
        subject[name] = f"{subject[name]}, {value}" if name in subject else value
    return PeerCertificate(subject=subject, sha256=hashlib.sha256(der).hexdigest())


def certificate_of(sock: object) -> PeerCertificate | None:
    """The verified client certificate of a TLS socket (None: plain TCP, or no certificate)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    der = sock.getpeercert(binary_form=True)
    return peer_certificate(der) if der else None
