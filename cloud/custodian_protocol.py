"""The custodian's request and reply: values, their canonical CBOR, and the checks. No I/O.

A client (the training service) asks the custodian process to release images for a purpose.
The request is signed by the asking ledger principal's Ed25519 key over
``"medchain/v1/custodian-request" || 0x00 || canonical CBOR``; the custodian serves only
principals it is configured for, checks the signature against the genesis key of that
principal, and refuses a request older or newer than :data:`WINDOW_MS` or one whose nonce it
has seen (a replayed request would be re-audited and re-released). Frames are a 4-byte
big-endian length and the CBOR bytes.
"""

from __future__ import annotations

import os
import struct
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from medchain.canonical import canonical_bytes, decode
from medchain.errors import EncodingError, SignatureInvalid
from medchain.identity import SigningKey, VerifyKey

from cloud.custodian import AccessReport
from cloud.errors import CustodianError, CustodianRefused

__all__ = ["ReleaseRequest", "ReleasedItem", "ReleaseReply", "ReplayGuard", "REQUEST_DOMAIN",
           "WINDOW_MS", "MAX_FRAME", "frame", "frame_length", "report_to_wire", "report_from_wire"]

VERSION = 1
REQUEST_DOMAIN = "medchain/v1/custodian-request"
WINDOW_MS = 60_000
MAX_FRAME = 1 << 30  # a reply carries the decrypted parts of a batch
_LEN = struct.Struct(">I")


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise CustodianError(f"custodian message of {len(payload)} bytes is over the limit")
    return _LEN.pack(len(payload)) + payload


def frame_length(head: bytes) -> int:
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise CustodianError(f"custodian message of {n} bytes announced: over the limit")
    return n


@dataclass(frozen=True)
class ReleaseRequest:
    """Release ``items`` ((envelope id hex, device id) pairs) for ``purpose`` to ``principal``;
    only the ``names`` parts (all when None)."""

    principal: str
    purpose: str
    action: str
    items: tuple[tuple[str, str], ...]
    names: tuple[str, ...] | None
    time_ms: int
    nonce: bytes

    def body(self) -> dict:
        return {"v": VERSION, "principal": self.principal, "purpose": self.purpose,
                "action": self.action, "items": [list(i) for i in self.items],
                "names": None if self.names is None else list(self.names),
                "time_ms": self.time_ms, "nonce": self.nonce}

    def signed(self, key: SigningKey) -> bytes:
        """The request as sent: body and signature, canonical CBOR."""
        body = canonical_bytes(self.body())
        return canonical_bytes({"body": body, "sig": key.sign_encoded(REQUEST_DOMAIN, body)})

    @classmethod
    def new(cls, principal: str, purpose: str, items, names=None, *, action: str = "read",
            now_ms: int, nonce: bytes | None = None) -> ReleaseRequest:
        return cls(principal, purpose, action, tuple((str(e), str(d)) for e, d in items),
                   None if names is None else tuple(names), now_ms, nonce or os.urandom(16))

    @classmethod
    def verified(cls, data: bytes, keys: Mapping[str, VerifyKey], *, now_ms: int,
                 guard: ReplayGuard) -> ReleaseRequest:
        """Parse ``data`` and check it; :class:`CustodianRefused` says why not (a principal
        not in ``keys`` is one the custodian does not serve)."""
        try:
            outer = decode(data)
            body_bytes, sig = outer["body"], outer["sig"]
            body = decode(body_bytes)
            if body["v"] != VERSION:
                raise CustodianRefused(f"custodian request version {body['v']!r} not supported")
            request = cls(str(body["principal"]), str(body["purpose"]), str(body["action"]),
                          tuple((str(e), str(d)) for e, d in body["items"]),
                          None if body["names"] is None else tuple(str(n) for n in body["names"]),
                          int(body["time_ms"]), bytes(body["nonce"]))
        except CustodianRefused:
            raise
        except (EncodingError, KeyError, TypeError, ValueError):
            raise CustodianRefused("malformed custodian request") from None
        key = keys.get(request.principal)
        if key is None:
            raise CustodianRefused(f"principal {request.principal!r} is not served by the custodian")
        try:
            key.verify_encoded(REQUEST_DOMAIN, body_bytes, sig)
        except SignatureInvalid:
            raise CustodianRefused(f"request of {request.principal!r}: signature does not verify") from None
        guard.check(request.nonce, request.time_ms, now_ms)
        return request


class ReplayGuard:
    """Refuses requests outside the time window and nonces seen within it."""

    def __init__(self, window_ms: int = WINDOW_MS):
        self.window_ms = window_ms
        self._seen: OrderedDict[bytes, int] = OrderedDict()

    def check(self, nonce: bytes, time_ms: int, now_ms: int) -> None:
        while self._seen and next(iter(self._seen.values())) < now_ms - 2 * self.window_ms:
            self._seen.popitem(last=False)
        if abs(now_ms - time_ms) > self.window_ms:
            raise CustodianRefused("custodian request is stale or from the future")
        if len(nonce) < 16 or nonce in self._seen:
            raise CustodianRefused("custodian request replayed")
        self._seen[nonce] = now_ms


@dataclass(frozen=True)
class ReleasedItem:
    envelope_id: str
    parts: dict[str, bytes]
    audit_id: int


def report_to_wire(report: AccessReport) -> dict:
    return {"requested": report.requested, "granted": report.granted,
            "denied": dict(report.denied), "unreadable": dict(report.unreadable),
            "denied_ids": [list(d) for d in report.denied_ids]}


def report_from_wire(data: dict) -> AccessReport:
    return AccessReport(int(data["requested"]), int(data["granted"]), Counter(data["denied"]),
                        Counter(data["unreadable"]), [(str(e), str(r)) for e, r in data["denied_ids"]])


@dataclass(frozen=True)
class ReleaseReply:
    """What the custodian answers: the released images and the report, or why it refused."""

    released: tuple[ReleasedItem, ...] = ()
    report: AccessReport | None = None
    error: str | None = None  # "refused: ..." or "failed: ..."; never a secret

    def encode(self) -> bytes:
        return canonical_bytes({
            "v": VERSION, "error": self.error,
            "report": None if self.report is None else report_to_wire(self.report),
            "released": [{"envelope_id": r.envelope_id, "parts": r.parts, "audit_id": r.audit_id}
                         for r in self.released]}, check=False)

    @classmethod
    def decode(cls, data: bytes) -> ReleaseReply:
        try:
            raw = decode(data)
            released = tuple(ReleasedItem(str(r["envelope_id"]), {str(k): bytes(v) for k, v in r["parts"].items()},
                                          int(r["audit_id"])) for r in raw["released"])
            report = None if raw["report"] is None else report_from_wire(raw["report"])
            return cls(released, report, raw["error"])
        except (EncodingError, KeyError, TypeError, ValueError, AttributeError):
            raise CustodianError("malformed reply from the custodian") from None
