"""Keyed pseudonyms: the one place identifiers become tokens, for images and records alike.

A plain hash of a low-entropy identifier (a 7-digit patient ID, an accession number) is
reversed by hashing every candidate; an HMAC under the site secret is not, as long as the
secret stays at the site. Every function here is pure: same secret and input, same output,
so de-identification and the clinical-records importer agree without sharing state.

Inputs are framed with canonical CBOR (``medchain.canonical``) rather than joined with a
separator, so ``issuer | value`` is unambiguous even when either part contains ``|``.
DICOM padding (trailing spaces or NULs) and surrounding whitespace are not part of an
identifier: ``"12345 "`` from a DICOM file and ``"12345"`` from a CSV export map alike.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from medchain.canonical import canonical_bytes

__all__ = ["Pseudonymizer", "patient_token", "pseudo_uid", "accession_pseudonym",
           "date_shift_days", "normalize_identifier", "MAX_DATE_SHIFT_DAYS"]

MAX_DATE_SHIFT_DAYS = 3650  # dates move back by 1..3650 days, one shift per patient


def normalize_identifier(value: str) -> str:
    return value.strip(" \x00\t\r\n")


def _mac(secret: bytes, *parts: str) -> bytes:
    if len(secret) < 16:
        raise ValueError("site secret must be at least 16 bytes")
    return hmac.new(secret, canonical_bytes(["medchain/v1/pseudonym", *parts]), hashlib.sha256).digest()


def patient_token(secret: bytes, issuer: str, patient_id: str) -> str:
    """``HMAC-SHA256(secret, issuer | patient id)`` as 64 hex characters (fits a DICOM LO)."""
    return _mac(secret, "patient", normalize_identifier(issuer), normalize_identifier(patient_id)).hex()


def accession_pseudonym(secret: bytes, issuer: str, accession: str) -> str:
    """A 16-hex-character (64-bit) keyed pseudonym: fits Accession Number's SH (16 chars)."""
    return _mac(secret, "accession", normalize_identifier(issuer), normalize_identifier(accession)).hex()[:16]


def pseudo_uid(secret: bytes, uid: str) -> str:
    """A replacement UID under ``2.25.``: the decimal form of a UUID (version 8, RFC 9562)
    built from ``HMAC(secret, uid)`` — same UID in, same UID out, at most 44 characters."""
    raw = bytearray(_mac(secret, "uid", normalize_identifier(uid))[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8: custom
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return "2.25." + str(int.from_bytes(raw, "big"))


def date_shift_days(secret: bytes, token: str) -> int:
    """The per-patient date shift (in days, 1..MAX_DATE_SHIFT_DAYS, applied backwards) for the
    Retain Longitudinal Temporal Information with Modified Dates option: intervals between a
    patient's studies survive, the calendar dates do not."""
    return 1 + int.from_bytes(_mac(secret, "date-shift", token)[:8], "big") % MAX_DATE_SHIFT_DAYS


@dataclass(frozen=True)
class Pseudonymizer:
    """The site secret bound to the functions above, with the site's default issuer."""

    secret: bytes
    default_issuer: str

    def __post_init__(self) -> None:
        if len(self.secret) < 16:
            raise ValueError("site secret must be at least 16 bytes")

    def __repr__(self) -> str:  # never show the secret
        return f"Pseudonymizer(default_issuer={self.default_issuer!r})"

    def issuer(self, issuer: str | None) -> str:
        issuer = normalize_identifier(issuer or "")
        return issuer or self.default_issuer

    def patient(self, patient_id: str, issuer: str | None = None) -> str:
        return patient_token(self.secret, self.issuer(issuer), patient_id)

    def accession(self, accession: str, issuer: str | None = None) -> str:
        return accession_pseudonym(self.secret, self.issuer(issuer), accession)

    def uid(self, uid: str) -> str:
        return pseudo_uid(self.secret, uid)

    def date_shift(self, token: str) -> int:
        return date_shift_days(self.secret, token)
