"""Mutual TLS for the ledger's links (Python's :mod:`ssl`, certificates from a consortium CA).

A genesis that records a CA certificate (``tls_ca``) puts every validator↔validator and
client↔validator link under mutual TLS: each side presents a certificate that CA issued and
checks the other's. A certificate's subject common name is the identity it stands for:
``validator-<id>`` for a validator (with the validator's address as subject alternative name,
which the caller checks as a host name), the principal's name for a client. A validator also
checks that the name in a caller's certificate is the one its signed ``Hello`` claims, so a
certificate cannot lend its channel to another key. A genesis without a CA is allowed only
while every validator is on loopback (the demo and most tests); see
:func:`ledger.genesis.Genesis` for that check.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl

from ledger.errors import LedgerError
from medchain.pki import Identity

__all__ = ["validator_cn", "server_context", "client_context", "peer_name", "is_loopback"]


def validator_cn(vid: int) -> str:
    """The subject common name of validator ``vid``'s certificate."""
    return f"validator-{vid}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _context(purpose: int, ca_pem: str, identity: Identity) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cadata=ca_pem)
        ctx.load_cert_chain(identity.cert, identity.key)
    except (ssl.SSLError, OSError) as exc:
        raise LedgerError(f"TLS: {identity.cert} with {identity.key} is not a usable "
                          f"certificate and key under the genesis CA ({exc.strerror or exc})") from None
    return ctx


def server_context(ca_pem: str, identity: Identity) -> ssl.SSLContext:
    """What a validator listens with: its certificate; callers must present one from the CA."""
    return _context(ssl.PROTOCOL_TLS_SERVER, ca_pem, identity)


def client_context(ca_pem: str, identity: Identity) -> ssl.SSLContext:
    """What a validator or client connects with: its certificate; the validator it reaches
    must present one from the CA naming its address."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, ca_pem, identity)


def peer_name(writer: asyncio.StreamWriter) -> str | None:
    """The subject common name of the certificate the peer presented (None without TLS)."""
    cert = writer.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None
