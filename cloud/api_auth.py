"""Signed HTTP requests: how a principal authenticates to the API. Pure: no I/O, no clock.

Each request carries four headers: ``X-MedChain-Principal`` (the ledger principal's name),
``X-MedChain-Time`` (milliseconds since the epoch), ``X-MedChain-Nonce`` (16 random bytes,
hex) and ``X-MedChain-Signature`` (hex): the principal's Ed25519 signature, under domain
``"medchain/v1/api-request"``, over the canonical CBOR of ``[principal, method, path with
query, SHA-256(body), time, nonce]``. The server verifies it against the key the ledger holds for
that principal (active principals only), refuses a time outside the window and a nonce
already seen (:class:`~cloud.custodian_protocol.ReplayGuard`). Why not mutual TLS:
docs/access.md.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cloud.custodian_protocol import ReplayGuard
from cloud.errors import ApiUnauthorized, CustodianRefused
from medchain.canonical import canonical_bytes
from medchain.errors import SignatureInvalid
from medchain.identity import SigningKey, VerifyKey

__all__ = ["API_DOMAIN", "HEADERS", "SignedBy", "sign_request", "verify_request"]

API_DOMAIN = "medchain/v1/api-request"
PRINCIPAL, TIME, NONCE, SIGNATURE = ("X-MedChain-Principal", "X-MedChain-Time", "X-MedChain-Nonce",
                                     "X-MedChain-Signature")
HEADERS = (PRINCIPAL, TIME, NONCE, SIGNATURE)


def _message(principal: str, method: str, target: str, body: bytes, time_ms: int, nonce: bytes) -> bytes:
    return canonical_bytes([principal, method.upper(), target, hashlib.sha256(body).digest(), time_ms, nonce])


def sign_request(key: SigningKey, principal: str, method: str, target: str, body: bytes, *,
                 now_ms: int, nonce: bytes | None = None) -> dict[str, str]:
    """The headers that authenticate one request (``target``: path and query string)."""
    nonce = nonce or os.urandom(16)
    sig = key.sign_encoded(API_DOMAIN, _message(principal, method, target, body, now_ms, nonce))
    return {PRINCIPAL: principal, TIME: str(now_ms), NONCE: nonce.hex(), SIGNATURE: sig.hex()}


@dataclass(frozen=True)
class SignedBy:
    """Who signed a request, as the ledger knows them."""

    name: str
    role: str


def verify_request(headers: Mapping[str, str], method: str, target: str, body: bytes, *,
                   lookup: Callable[[str], dict | None], now_ms: int, guard: ReplayGuard) -> SignedBy:
    """The verified signer, or :class:`ApiUnauthorized` saying which check failed (never
    the key or the signature). ``lookup``: the ledger's principal record for a name."""
    lower = {k.lower(): v for k, v in headers.items()}
    missing = [h for h in HEADERS if h.lower() not in lower]
    if missing:
        raise ApiUnauthorized(f"request is not signed: header(s) {', '.join(missing)} missing", "unsigned")
    name = lower[PRINCIPAL.lower()]
    try:
        time_ms, nonce = int(lower[TIME.lower()]), bytes.fromhex(lower[NONCE.lower()])
        sig = bytes.fromhex(lower[SIGNATURE.lower()])
    except ValueError:
        raise ApiUnauthorized("request signature headers are malformed", "malformed") from None
    principal = lookup(name)
    if principal is None or not principal["active"]:
        raise ApiUnauthorized(f"principal {name!r} is unknown or revoked", "unknown-or-revoked")
    try:
        VerifyKey(principal["key"]).verify_encoded(API_DOMAIN, _message(name, method, target, body, time_ms, nonce),
                                                   sig)
    except SignatureInvalid:
        raise ApiUnauthorized(f"request of {name!r}: signature does not verify", "bad-signature") from None
    try:
        guard.check(nonce, time_ms, now_ms)
    except CustodianRefused as exc:
        raise ApiUnauthorized(str(exc).replace("custodian request", "request"),
                              "replayed" if "replayed" in str(exc) else "stale") from None
    return SignedBy(name, principal["role"])
