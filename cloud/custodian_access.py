"""The custodian's side of a person's fetch: verify the grant, re-wrap the data key.

Run inside the custodian process (the only holder of the custodian key). For a
:class:`~cloud.access_protocol.FetchRequest` it:

1. looks the principal up on the ledger (f + 1 validators agree) and checks the request's
   signature against the Ed25519 key the ledger holds for it; refuses stale and replayed
   requests;
2. per image, reads the audit entry the request names (by id, f + 1 validators agree) and
   checks it is a committed grant of that image, to that principal, for that purpose (a
   grant for image A never opens image B, nor another principal's grant anything);
3. files ``ACCESS_REQUESTED`` (action ``fetch``) on behalf of the principal for every image
   asked for, so the attempt is audited and decided under the consent and principal status
   in force *now* (consent revoked, or the principal revoked, since the grant: refused);
4. for images that pass both, reads the stored envelope, checks its id, its Merkle root
   against the ledger's ``IMAGE_REGISTERED`` record (carried by the decision) and its
   device signature, unwraps the data key through the key backend and re-wraps it with
   HPKE to the principal's X25519 key, ``info`` binding object id and principal name.

Nothing decrypted leaves this process: the reply carries only re-wrapped keys, or the
contract's or the custodian's reason per image.
"""

from __future__ import annotations

import logging
from collections import Counter

from cloud.access_protocol import (
    FETCH_DOMAIN,
    FetchItem,
    FetchReply,
    FetchRequest,
    parse_fetch,
)
from cloud.auth_failures import FailureLog
from cloud.custodian_protocol import ReplayGuard
from cloud.errors import CustodianRefused, ObjectMismatch
from cloud.objectstore import ObjectStore
from ledger.client import LedgerClient
from ledger.errors import LedgerError
from medchain.errors import MedChainError, SignatureInvalid
from medchain.identity import RecipientPublicKey, VerifyKey
from medchain.sealing import KeyUnwrapper, verify, wrap_key_for_principal

__all__ = ["FETCH_ACTION", "NO_GRANT", "REQUEST_ACTION", "AccessGate"]

REQUEST_ACTION = "request"
FETCH_ACTION = "fetch"
NO_GRANT = "no committed grant of this image to this principal for this purpose"

log = logging.getLogger("medchain.custodian")


class AccessGate:
    """Answers fetch requests: ``ledger`` is the custodian principal's client (its role may
    act on behalf of others), ``key`` the custodian key backend."""

    def __init__(self, ledger: LedgerClient, store: ObjectStore, key: KeyUnwrapper,
                 guard: ReplayGuard, failures: FailureLog | None = None):
        self.ledger, self.store, self._key, self._guard = ledger, store, key, guard
        # fetches that establish no principal: counted and logged with the name they claimed
        self.failures = failures if failures is not None else FailureLog()
        self.counts: Counter = Counter()
        self._devices: dict[str, bytes | None] = {}  # as cloud/custodian.py: a key per device

    def answer(self, outer: dict, now_ms: int) -> FetchReply:
        try:
            request, principal = self._verified(outer, now_ms)
        except CustodianRefused as exc:
            self.counts["fetches refused"] += 1
            log.warning("custodian: fetch refused: %s", exc)
            return FetchReply(error=f"refused: {exc}")
        except (LedgerError, TimeoutError) as exc:
            return FetchReply(error=f"failed: the ledger did not answer: {exc}")
        try:
            items = self._items(request, principal)
        except (LedgerError, TimeoutError) as exc:
            return FetchReply(error=f"failed: the ledger did not decide: {exc}")
        for item in items:
            if item.wrapped_key is None:
                self.counts["keys refused"] += 1
                log.info("custodian: key of %s refused to %s: %s", item.envelope_id,
                         request.principal, item.refused)
            else:
                self.counts["keys re-wrapped"] += 1
                log.info("custodian: key of %s re-wrapped to %s (audit %d)", item.envelope_id,
                         request.principal, item.audit_id)
        return FetchReply(tuple(items))

    def _verified(self, outer: dict, now_ms: int) -> tuple[FetchRequest, dict]:
        request, body, sig = parse_fetch(outer)
        principal = self.ledger.principal(request.principal)
        if principal is None:
            self.failures.record("custodian", "unknown-or-revoked", request.principal)
            raise CustodianRefused(f"principal {request.principal!r} is not on the ledger")
        try:
            VerifyKey(principal["key"]).verify_encoded(FETCH_DOMAIN, body, sig)
        except SignatureInvalid:
            self.failures.record("custodian", "bad-signature", request.principal)
            raise CustodianRefused(
                f"fetch of {request.principal!r}: signature does not verify") from None
        try:
            self._guard.check(request.nonce, request.time_ms, now_ms)
        except CustodianRefused as exc:
            self.failures.record("custodian", "replayed" if "replayed" in str(exc) else "stale",
                                 request.principal)
            raise
        if principal.get("recipient") is None:
            raise CustodianRefused(f"principal {request.principal!r} has no recipient key")
        return request, principal

    def _items(self, request: FetchRequest, principal: dict) -> list[FetchItem]:
        wanted = sorted({grant_id for _, grant_id in request.items if grant_id >= 0})
        grants = {e["id"]: e for e in self.ledger.audit_entries(wanted) if e is not None}
        ids = [bytes.fromhex(e) for e, _ in request.items]
        decisions = self.ledger.access_many(request.principal, ids, request.purpose,
                                            FETCH_ACTION)
        recipient = RecipientPublicKey(principal["recipient"])
        out = []
        for (envelope_id, grant_id), decision in zip(request.items, decisions):
            audit_id = int(decision.audit["id"])
            grant = grants.get(grant_id)
            if not (grant and grant["granted"] and grant["action"] == REQUEST_ACTION
                    and grant["user"] == request.principal and grant["image"].hex() == envelope_id
                    and grant["purpose"] == request.purpose):
                out.append(FetchItem(envelope_id, audit_id=audit_id, refused=NO_GRANT))
            elif not decision.granted:
                out.append(FetchItem(envelope_id, audit_id=audit_id, refused=decision.reason))
            else:
                try:
                    wrapped = self._rewrap(envelope_id, decision.merkle_root, request.principal,
                                           recipient)
                except _Refused as why:
                    out.append(FetchItem(envelope_id, audit_id=audit_id, refused=str(why)))
                else:
                    out.append(FetchItem(envelope_id, wrapped, audit_id))
        return out

    def _rewrap(self, envelope_id: str, root: bytes | None, principal: str,
                recipient: RecipientPublicKey) -> bytes:
        try:
            envelope = self.store.get(envelope_id)
        except ObjectMismatch:
            raise _Refused("stored object is another image's") from None
        except MedChainError:
            raise _Refused("stored object not readable") from None
        header = envelope.header
        if envelope.envelope_id != envelope_id:
            raise _Refused("stored object is another image's")
        if root is None or header.merkle_root != root:
            raise _Refused("stored object is not the one the ledger registered")
        if header.device_id not in self._devices:
            self._devices[header.device_id] = self.ledger.device(header.device_id).public_key
        device = self._devices[header.device_id]
        if device is None:
            raise _Refused("device unknown on the ledger")
        try:
            verify(envelope, VerifyKey(device))
            data_key = self._key.unwrap(header.wrapped_key, header.object_id)
        except MedChainError:
            raise _Refused("stored object failed verification") from None
        return wrap_key_for_principal(data_key, header.object_id, principal, recipient)


class _Refused(Exception):
    """Internal: why a granted image's key is not re-wrapped (short, PHI-free)."""
