"""A person's fetch of granted images from the custodian: the request, the reply. No I/O.

A principal that the ledger granted images (``ACCESS_REQUESTED`` with action ``request``)
asks the custodian to re-wrap their data keys to its own X25519 key. The request names, per
image, the audit entry that granted it, and is signed by the principal's ledger Ed25519 key
over ``"medchain/v1/access-fetch" || 0x00 || canonical CBOR``. The custodian serves any
principal registered on the ledger: it verifies the signature against the key the ledger
holds for that name (not a list of its own), refuses stale and replayed requests
(:class:`~cloud.custodian_protocol.ReplayGuard`), and answers per image with a re-wrapped
key or the reason it refused. Framing is the custodian socket's; the outer map carries
``"kind": "fetch"`` so the two request kinds cannot be confused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cloud.errors import CustodianError, CustodianRefused
from medchain.canonical import canonical_bytes, decode
from medchain.errors import EncodingError
from medchain.identity import SigningKey

__all__ = ["FETCH_DOMAIN", "FETCH_KIND", "FetchItem", "FetchReply", "FetchRequest", "parse_fetch"]

VERSION = 1
FETCH_DOMAIN = "medchain/v1/access-fetch"
FETCH_KIND = "fetch"
MAX_ITEMS = 1000
_HEX = set("0123456789abcdef")


@dataclass(frozen=True)
class FetchRequest:
    """``principal`` asks for the data keys of ``items`` ((envelope id hex, granting audit
    id) pairs), granted to it for ``purpose``."""

    principal: str
    purpose: str
    items: tuple[tuple[str, int], ...]
    time_ms: int
    nonce: bytes

    def body(self) -> dict:
        return {"v": VERSION, "principal": self.principal, "purpose": self.purpose,
                "items": [list(i) for i in self.items], "time_ms": self.time_ms,
                "nonce": self.nonce}

    @classmethod
    def new(cls, principal: str, purpose: str, items, *, now_ms: int,
            nonce: bytes | None = None) -> FetchRequest:
        return cls(principal, purpose, tuple((str(e), int(a)) for e, a in items), now_ms,
                   nonce or os.urandom(16))

    def signed(self, key: SigningKey) -> bytes:
        body = canonical_bytes(self.body())
        return canonical_bytes({"kind": FETCH_KIND, "body": body,
                                "sig": key.sign_encoded(FETCH_DOMAIN, body)})


def parse_fetch(outer: dict) -> tuple[FetchRequest, bytes, bytes]:
    """The request, its signed body bytes and signature, from the decoded outer map; the
    signature is checked by the caller, against the ledger's key for the principal."""
    try:
        body_bytes, sig = bytes(outer["body"]), bytes(outer["sig"])
        body = decode(body_bytes)
        if body["v"] != VERSION:
            raise CustodianRefused(f"fetch request version {body['v']!r} not supported")
        items = tuple((str(e), int(a)) for e, a in body["items"])
        if not 0 < len(items) <= MAX_ITEMS:
            raise CustodianRefused(f"a fetch names 1 to {MAX_ITEMS} images")
        if not all(len(e) == 32 and set(e) <= _HEX and a >= 0 for e, a in items):
            raise CustodianRefused("malformed fetch request: an image id or grant id")
        request = FetchRequest(str(body["principal"]), str(body["purpose"]), items,
                               int(body["time_ms"]), bytes(body["nonce"]))
    except CustodianRefused:
        raise
    except (EncodingError, KeyError, TypeError, ValueError):
        raise CustodianRefused("malformed fetch request") from None
    return request, body_bytes, sig


@dataclass(frozen=True)
class FetchItem:
    """One image's answer: the data key re-wrapped to the requester (``wrapped_key``), with
    the audit id of the custodian's own decision at fetch time; or the ``refused`` reason."""

    envelope_id: str
    wrapped_key: bytes | None = None
    audit_id: int | None = None
    refused: str | None = None


@dataclass(frozen=True)
class FetchReply:
    items: tuple[FetchItem, ...] = ()
    error: str | None = None  # the whole request refused: "refused: ..."; never a secret

    def encode(self) -> bytes:
        return canonical_bytes({"v": VERSION, "error": self.error, "items": [
            {"envelope_id": i.envelope_id, "wrapped_key": i.wrapped_key, "audit_id": i.audit_id,
             "refused": i.refused} for i in self.items]})

    @classmethod
    def decode(cls, data: bytes) -> FetchReply:
        try:
            raw = decode(data)
            items = tuple(FetchItem(str(i["envelope_id"]),
                                    None if i["wrapped_key"] is None else bytes(i["wrapped_key"]),
                                    None if i["audit_id"] is None else int(i["audit_id"]),
                                    None if i["refused"] is None else str(i["refused"]))
                          for i in raw["items"])
            return cls(items, raw["error"])
        except (EncodingError, KeyError, TypeError, ValueError, AttributeError):
            raise CustodianError("malformed fetch reply from the custodian") from None
