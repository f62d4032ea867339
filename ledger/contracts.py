"""The contracts: consent, role-based access, audit, devices, images, models, principals.

A pure state machine over :class:`ledger.state.State`: ``apply(ctx, tx)`` either writes and
returns an output, or raises :class:`Rejected` (the caller rolls the writes back). Time is
``ctx.time``, the agreed block time, never a clock, so every honest validator reaches the same
state from the same committed log.

Access rule (DESIGN §4): ``Access(U, I) = 1 iff role(U) ∈ policy(I).allowed[purpose] and
consent(I.patient, purpose) is valid``, where consent is valid when the latest CONSENT_SET for
that patient token and purpose grants it and has not expired, or, when there is none, when
the image was registered with that purpose among its consent flags. Every ACCESS_REQUESTED
becomes an audit entry, granted or denied, indexed by user, patient token and image; so does
every AUDIT_READ (a read of a patient token's consent history or audit trail, decided by
role: :data:`READERS`).

State keys (values are canonical-CBOR maps): ``principal/<name>`` (+
``principal_key/<hex>``), ``device/<id>``,
``devseq/<device>/<sequence>``, ``image/<envelope hex>``, ``consent/<token>/<purpose>``,
``consent_h/<token>/<k>`` (+ ``consent_n/<token>``), ``policy/<id>``, ``audit/<k>`` (+
``audit_n``) with ``audit_u|audit_p|audit_i/<key>/<j>`` indexes, ``model/<hash hex>``,
``inference/<root hex>``, ``config/permissions``, ``config/on_behalf``, ``meta/time``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ledger.state import State
from ledger.transactions import (
    READ_QUERIES,
    AccessRequested,
    AuditRead,
    ConsentSet,
    DeviceEnrolled,
    DeviceRevoked,
    ImageRegistered,
    InferenceRecorded,
    ModelReleased,
    PolicySet,
    PrincipalSet,
    Transaction,
)

__all__ = ["Contracts", "TxContext", "Rejected", "genesis_state", "AUDIT_INDEXES", "AUDITORS",
           "API_ROLES", "LISTERS", "READERS"]

AUDIT_INDEXES = {"user": "audit_u", "patient": "audit_p", "image": "audit_i"}
MAX_LIST = 1000  # most entries a history or audit query returns at once
AUDITORS = frozenset({"auditor"})  # read any principal's audit trail and entries
# who may list (queries not keyed by a patient, answered only to these roles): the studies
# listing (metadata only) to those who could ask for images, who oversee, and the API that
# serves them; the principal list to the operator and the auditor
LISTERS = {"studies": frozenset({"clinician", "radiologist", "researcher", "auditor", "operator", "api"}),
           "principals": frozenset({"operator", "auditor"})}
# who may read a patient token's history (AUDIT_READ), per query: the registrar keeps
# consent, the auditor oversees both; nobody else, the operator included. The studies
# listing filtered by a patient token is such a read too: for the listing roles, the API
# excepted (it could only ever read for itself)
READERS = {"consent": frozenset({"registrar", "auditor"}), "audit": frozenset({"auditor"}),
           "studies": LISTERS["studies"] - {"api"}}
PURPOSE_LIST = ("diagnosis", "research", "training", "sharing")
# the HTTP API's role: it files requests on a signer's behalf (action "request" only: a fetch
# is filed by the custodian, which checks the signer's own signature), reads the trail of the
# signers it serves by user, and lists studies; nothing else (docs/access.md)
API_ROLES = frozenset({"api"})
API_ACTIONS = ("request",)


class Rejected(Exception):
    """A contract refuses a transaction; ``reason`` is safe to show (no PHI, no keys)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TxContext:
    submitter: str
    role: str
    time: int
    height: int
    index: int


def genesis_state(genesis) -> State:
    """The state at height 0, from a :class:`ledger.genesis.Genesis`."""
    state = State()
    for p in genesis.principals:
        state.put(f"principal/{p.name}",
                  {"role": p.role, "key": bytes.fromhex(p.public_key), "active": True})
        state.put(f"principal_key/{p.public_key}", p.name)
    state.put("config/permissions", {r: sorted(t) for r, t in genesis.permissions.items()})
    state.put("config/on_behalf", sorted(genesis.on_behalf))
    for name, allowed in genesis.policies.items():
        state.put(f"policy/{name}", {p: sorted(r) for p, r in allowed.items()})
    state.put("meta/time", genesis.genesis_time_ms)
    state.put("meta/chain", genesis.chain_id)
    state.seal(0)
    return state


def _append(state: State, counter: str, prefix: str, value: Any) -> int:
    k = state.get(counter, 0)
    state.put(f"{prefix}/{k}", value)
    state.put(counter, k + 1)
    return k


class Contracts:
    """Transaction rules and read-only queries over one :class:`State`."""

    def __init__(self, state: State):
        self.state = state

    # -- principals and permissions ------------------------------------------------------------

    def principal(self, name: str) -> dict | None:
        return self.state.get(f"principal/{name}")

    def may_submit(self, role: str, tx_type: str) -> bool:
        return tx_type in self.state.get("config/permissions", {}).get(role, ())

    @property
    def now(self) -> int:
        return self.state.get("meta/time", 0)

    def advance_time(self, t: int) -> int:
        """The block time: the proposal time, never going backwards (null blocks have t=0)."""
        now = max(self.now, t)
        if now != self.now:
            self.state.put("meta/time", now)
        return now

    # -- transactions --------------------------------------------------------------------------

    def apply(self, ctx: TxContext, tx: Transaction) -> dict:
        """Apply ``tx``; return its output map or raise :class:`Rejected`."""
        if isinstance(tx, AccessRequested):
            return self._access(ctx, tx)  # decided and audited even when not permitted
        if isinstance(tx, AuditRead):
            return self._audit_read(ctx, tx)  # likewise
        if not self.may_submit(ctx.role, tx.TYPE):
            raise Rejected(f"role {ctx.role!r} may not submit {tx.TYPE}")
        return _HANDLERS[type(tx)](self, ctx, tx)

    def _stamp(self, ctx: TxContext) -> dict:
        return {"t": ctx.time, "height": ctx.height, "index": ctx.index, "by": ctx.submitter}

    def _principal_set(self, ctx: TxContext, tx: PrincipalSet) -> dict:
        if tx.name == ctx.submitter and (not tx.active or tx.role != ctx.role):
            raise Rejected("an operator cannot deactivate or demote itself")
        owner = self.state.get(f"principal_key/{tx.public_key.hex()}")
        if owner is not None and owner != tx.name:
            raise Rejected("public key already belongs to another principal")
        old = self.principal(tx.name)
        if old is not None and old["key"] != tx.public_key:
            self.state.delete(f"principal_key/{old['key'].hex()}")
        record = {"role": tx.role, "key": tx.public_key, "active": tx.active}
        if tx.recipient_key is not None:
            record["recipient"] = tx.recipient_key
        self.state.put(f"principal/{tx.name}", record)
        self.state.put(f"principal_key/{tx.public_key.hex()}", tx.name)
        return {"principal": tx.name, "role": tx.role, "active": tx.active}

    def _device_enrolled(self, ctx: TxContext, tx: DeviceEnrolled) -> dict:
        key = f"device/{tx.device_id}"
        existing = self.state.get(key)
        if existing is not None:
            if existing["status"] == "revoked":
                raise Rejected("device is revoked; enrol it under a new id")
            if existing["public_key"] != tx.public_key:
                raise Rejected("device already enrolled with another key")
            return {"device": dict(existing), "duplicate": True}
        record = {"device_id": tx.device_id, "public_key": tx.public_key, "site": tx.site,
                  "group": tx.group, "status": "enrolled", "enrolled": self._stamp(ctx)}
        self.state.put(key, record)
        return {"device": record, "duplicate": False}

    def _device_revoked(self, ctx: TxContext, tx: DeviceRevoked) -> dict:
        key = f"device/{tx.device_id}"
        existing = self.state.get(key)
        if existing is None:
            raise Rejected("unknown device")
        if existing["status"] == "revoked":
            return {"device": dict(existing), "duplicate": True}
        record = dict(existing, status="revoked",
                      revoked=dict(self._stamp(ctx), reason=tx.reason))
        self.state.put(key, record)
        return {"device": record, "duplicate": False}

    def _active_device(self, device_id: str) -> dict:
        device = self.state.get(f"device/{device_id}")
        if device is None:
            raise Rejected("device not enrolled")
        if device["status"] != "enrolled":
            raise Rejected("device revoked")
        return device

    def _image_registered(self, ctx: TxContext, tx: ImageRegistered) -> dict:
        key = f"image/{tx.envelope_id.hex()}"
        existing = self.state.get(key)
        if existing is not None:  # at-least-once delivery: a duplicate returns the record
            return {"record": existing, "duplicate": True}
        self._active_device(tx.device_id)
        seq_key = f"devseq/{tx.device_id}/{tx.sequence}"
        if seq_key in self.state:
            raise Rejected("device sequence number already used by another envelope")
        if f"policy/{tx.policy}" not in self.state:
            raise Rejected("unknown policy")
        record = dict(tx.to_wire(), consent=sorted(tx.consent), **self._stamp(ctx))
        del record["type"]
        self.state.put(key, record)
        self.state.put(seq_key, tx.envelope_id)
        return {"duplicate": False}  # the record is the transaction itself

    def _consent_set(self, ctx: TxContext, tx: ConsentSet) -> dict:
        entry = {"purpose": tx.purpose, "granted": tx.granted, "time_ms": tx.time_ms,
                 "expires_ms": tx.expires_ms, **self._stamp(ctx)}
        self.state.put(f"consent/{tx.patient}/{tx.purpose}", entry)
        k = _append(self.state, f"consent_n/{tx.patient}", f"consent_h/{tx.patient}", entry)
        return {"consent": entry, "version": k}

    def _policy_set(self, ctx: TxContext, tx: PolicySet) -> dict:
        allowed = {p: sorted(set(r)) for p, r in tx.allowed.items()}
        self.state.put(f"policy/{tx.policy}", allowed)
        return {"policy": tx.policy, "allowed": allowed}

    def _model_released(self, ctx: TxContext, tx: ModelReleased) -> dict:
        key = f"model/{tx.model_hash.hex()}"
        if key in self.state:
            raise Rejected("model already released")
        record = dict(tx.to_wire(), **self._stamp(ctx))
        del record["type"]
        self.state.put(key, record)
        return {"model": record}

    def _inference_recorded(self, ctx: TxContext, tx: InferenceRecorded) -> dict:
        key = f"inference/{tx.batch_root.hex()}"
        existing = self.state.get(key)
        if existing is not None:
            return {"record": existing, "duplicate": True}
        self._active_device(tx.device_id)
        if tx.model_hash is not None and f"model/{tx.model_hash.hex()}" not in self.state:
            raise Rejected("unknown model")
        record = dict(tx.to_wire(), **self._stamp(ctx))
        del record["type"]
        self.state.put(key, record)
        return {"record": record, "duplicate": False}

    # -- access decisions and audit ------------------------------------------------------------

    def consent_valid(self, patient: str, purpose: str, flags: list | tuple,
                      now: int, as_of: dict | None = None) -> tuple[bool, str]:
        """``as_of`` (purpose -> latest CONSENT_SET entry, :meth:`consent_as_of`): decide on
        the consent as it stood then instead of the current one."""
        latest = self.state.get(f"consent/{patient}/{purpose}") if as_of is None else as_of.get(purpose)
        if latest is None:
            return (True, "consent given at acquisition") if purpose in flags else (
                False, "no consent for purpose")
        if not latest["granted"]:
            return False, "consent revoked"
        if latest["expires_ms"] and now >= latest["expires_ms"]:
            return False, "consent expired"
        return True, "consent granted"

    def decide(self, submitter: dict | None, submitter_name: str, tx: AccessRequested,
               now: int) -> tuple[bool, str, dict | None]:
        """The access decision, its reason, and the image record when it exists (so the
        audit entry names the patient token whenever the image is known)."""
        image = self.state.get(f"image/{tx.envelope_id.hex()}")
        if submitter is None or not self.may_submit(submitter["role"], tx.TYPE):
            return False, "submitter may not request access", image
        if tx.user != submitter_name and submitter["role"] not in self.state.get(
                "config/on_behalf", ()):
            return False, "submitter may not request access for another user", image
        if submitter["role"] in API_ROLES and tx.action not in API_ACTIONS:
            return False, f"the API files {' or '.join(API_ACTIONS)} only", image
        user = self.principal(tx.user)
        if user is None or not user["active"]:
            return False, "unknown or inactive user", image
        if image is None:
            return False, "unknown image", None
        policy = self.state.get(f"policy/{image['policy']}")
        if policy is None:
            return False, "unknown policy", image
        if user["role"] not in policy.get(tx.purpose, ()):
            return False, "role not allowed for purpose", image
        ok, reason = self.consent_valid(image["patient"], tx.purpose, image["consent"], now)
        return ok, ("granted" if ok else reason), image

    def _audit(self, ctx: TxContext, fields: dict) -> dict:
        """Write one audit entry, indexed by user, patient token and image."""
        entry = {"id": self.state.get("audit_n", 0), **fields, **self._stamp(ctx)}
        audit_id = _append(self.state, "audit_n", "audit", entry)
        for field, prefix in AUDIT_INDEXES.items():
            value = entry[field]
            if value is None:
                continue
            key = value.hex() if isinstance(value, bytes) else value
            _append(self.state, f"{prefix}_n/{key}", f"{prefix}/{key}", audit_id)
        return entry

    def _access(self, ctx: TxContext, tx: AccessRequested) -> dict:
        granted, reason, image = self.decide(self.principal(ctx.submitter), ctx.submitter, tx,
                                             ctx.time)
        entry = self._audit(ctx, {
            "user": tx.user, "image": tx.envelope_id, "patient": image["patient"] if image else None,
            "purpose": tx.purpose, "action": tx.action, "granted": granted, "reason": reason})
        out = {"granted": granted, "reason": reason, "audit": entry}
        if granted:  # what the custodian may release: exactly the registered object
            out["merkle_root"] = image["merkle_root"]
        return out

    def _audit_read(self, ctx: TxContext, tx: AuditRead) -> dict:
        """A read of a patient token's history, decided by role and audited either way. The
        entry records what was read and how far (``upto``: the length of the history or
        trail at that moment, this read included), so a query naming it sees exactly what
        the trail says was seen, however long after."""
        if tx.by not in READ_QUERIES[tx.query]:
            raise Rejected(f"{tx.query} history is read by {' or '.join(READ_QUERIES[tx.query])}")
        image, patient, key = None, tx.key, tx.key
        if tx.by == "image":
            try:
                image = bytes.fromhex(tx.key)
            except ValueError:
                image = b""
            if len(image) != 16:
                raise Rejected("key: an envelope id is 32 hex digits")
            record = self.image(image)
            patient, key = (record["patient"] if record else None), image.hex()
        granted = ctx.role in READERS[tx.query]
        if tx.query == "consent":
            upto = self.state.get(f"consent_n/{patient}", 0)
        elif tx.query == "studies":  # the listing as of this block: images registered up to it
            upto = ctx.height
        else:  # the trail as it stands once this read is on it
            index = AUDIT_INDEXES[tx.by]
            upto = self.state.get(f"{index}_n/{key}", 0) + (key is not None)
        entry = self._audit(ctx, {
            "user": ctx.submitter, "image": image, "patient": patient, "purpose": None,
            "action": f"read-{tx.query}", "granted": granted,
            "reason": "granted" if granted else (
                "role may not list studies by patient" if tx.query == "studies"
                else f"role may not read {tx.query} history"),
            "read": {"by": tx.by, "key": key}, "upto": upto if granted else 0})
        return {"granted": granted, "reason": entry["reason"], "audit": entry}

    def oversees(self, name: str, *, by_id: bool = False) -> bool:
        """May ``name`` read any principal's audit trail: an auditor, or a service role that
        acts on behalf of others (the API, the custodian: they read the trail of the
        principal they act for). ``by_id`` (audit entries by id, which the custodian reads
        for the grant a fetch names): not the API, which reads trails by user only."""
        p = self.principal(name)
        if not p or not p["active"] or (by_id and p["role"] in API_ROLES):
            return False
        return p["role"] in AUDITORS or p["role"] in self.state.get("config/on_behalf", ())

    def may_list(self, name: str, what: str) -> bool:
        """May ``name`` (active) list ``what`` (:data:`LISTERS`)."""
        p = self.principal(name)
        return bool(p and p["active"] and p["role"] in LISTERS[what])

    def read_upto(self, asker: str, query: str, by: str, key: str | bytes, read_id) -> int:
        """How far ``asker`` may read a patient token's history: the ``upto`` of the granted
        read (``AUDIT_READ``) it names, of this query and subject, by this asker, whose
        role may still read it; :class:`Rejected` otherwise."""
        entry = self.state.get(f"audit/{read_id}") if type(read_id) is int and read_id >= 0 else None
        k = key.hex() if isinstance(key, bytes) else key
        if entry is None or entry["action"] != f"read-{query}" or entry["user"] != asker or \
                not entry["granted"] or entry.get("read") != {"by": by, "key": k}:
            raise Rejected(f"{query} by {by} is answered only for a granted read of your own "
                           "(AUDIT_READ) named in 'read'")
        me = self.principal(asker)
        if me is None or not me["active"] or me["role"] not in READERS[query]:
            raise Rejected(f"your role may not read {query} history")
        return entry["upto"]

    def read_entry(self, read_id: int) -> dict:
        """The audit entry of a read (after :meth:`read_upto` accepted it)."""
        return self.state.get(f"audit/{read_id}")

    # -- queries -------------------------------------------------------------------------------

    def device(self, device_id: str) -> dict | None:
        return self.state.get(f"device/{device_id}")

    def studies(self, *, modality: str | None = None, patient: str | None = None,
                study: str | None = None, series: str | None = None,
                limit: int = MAX_LIST, as_of: dict | None = None) -> list[dict]:
        """Registered studies, metadata only: pseudonymous patient, study, modality, series
        with their envelope ids, the study date as the edge shifted it (the earliest of its
        images'; None when the edge keeps no dates), and the purposes for which consent is
        valid now. A scan of
        the state (image records), filtered (by ``series``: that series alone); at most
        ``limit`` studies. ``as_of`` (the audit entry of a read, for a listing by patient):
        the images registered before that read and the consent as it stood then."""
        position = None if as_of is None else (as_of["height"], as_of["index"])
        found: dict[tuple[str, str], dict] = {}
        for key, rec in self.state.items():
            if not key.startswith("image/") or (modality and rec["modality"] != modality) or (
                    patient and rec["patient"] != patient) or (study and rec["study_uid"] != study) or (
                    series and rec["series_uid"] != series) or (
                    position is not None and (rec["height"], rec["index"]) > position):
                continue
            s = found.setdefault((rec["patient"], rec["study_uid"]), {
                "patient": rec["patient"], "study": rec["study_uid"], "modalities": set(),
                "series": {}, "registered_t": rec["t"], "flags": set(), "policies": set(), "dates": set()})
            s["modalities"].add(rec["modality"])
            s["series"].setdefault(rec["series_uid"], []).append(rec["envelope_id"].hex())
            s["registered_t"] = min(s["registered_t"], rec["t"])
            s["flags"].update(rec["consent"])
            s["policies"].add(rec["policy"])
            if rec.get("study_date"):
                s["dates"].add(rec["study_date"])
        out = []
        now = self.now if as_of is None else as_of["t"]
        for (patient_token, _), s in sorted(found.items())[:limit]:
            then = None if position is None else self.consent_as_of(patient_token, position)
            consented = [p for p in PURPOSE_LIST
                         if self.consent_valid(patient_token, p, sorted(s["flags"]), now, then)[0]]
            out.append({"patient": s["patient"], "study": s["study"],
                        "modalities": sorted(s["modalities"]), "registered_t": s["registered_t"],
                        "study_date": min(s["dates"]) if s["dates"] else None,
                        "policies": sorted(s["policies"]), "consented": consented,
                        "series": {k: sorted(v) for k, v in sorted(s["series"].items())}})
        return out

    def consent_as_of(self, patient: str, position: tuple[int, int]) -> dict:
        """Purpose -> the latest ``CONSENT_SET`` entry committed before ``position`` (block
        height, index in the block)."""
        latest = {}
        for k in range(self.state.get(f"consent_n/{patient}", 0)):
            entry = self.state.get(f"consent_h/{patient}/{k}")
            if (entry["height"], entry["index"]) < position:
                latest[entry["purpose"]] = entry
        return latest

    def principals(self, limit: int = MAX_LIST) -> list[dict]:
        """Every principal (name, role, active, keys), by name; a scan of the state."""
        found = sorted((k[len("principal/"):], v) for k, v in self.state.items()
                       if k.startswith("principal/"))
        return [{"name": n, "role": v["role"], "key": v["key"], "active": v["active"],
                 "recipient": v.get("recipient")} for n, v in found[:limit]]

    def image(self, envelope_id: bytes) -> dict | None:
        return self.state.get(f"image/{envelope_id.hex()}")

    def model(self, model_hash: bytes) -> dict | None:
        return self.state.get(f"model/{model_hash.hex()}")

    def inference(self, batch_root: bytes) -> dict | None:
        return self.state.get(f"inference/{batch_root.hex()}")

    def policy(self, policy_id: str) -> dict | None:
        return self.state.get(f"policy/{policy_id}")

    def consent(self, patient: str, start: int = 0, limit: int = MAX_LIST,
                upto: int | None = None) -> dict:
        """Current consent per purpose and the full history, oldest first; with ``upto``,
        as they stood when the history had ``upto`` entries."""
        total = self.state.get(f"consent_n/{patient}", 0)
        if upto is None:
            current = {p: self.state.get(f"consent/{patient}/{p}") for p in PURPOSE_LIST}
        else:
            total = min(total, upto)
            current = {}
            for k in range(total):
                entry = self.state.get(f"consent_h/{patient}/{k}")
                current[entry["purpose"]] = entry
        end = min(total, start + min(limit, MAX_LIST))
        return {"current": {p: c for p, c in current.items() if c is not None},
                "history": [self.state.get(f"consent_h/{patient}/{k}") for k in range(start, end)],
                "total": total}

    def audit_entries(self, ids: list[int]) -> list[dict | None]:
        """The audit entries with these ids (None for an id not yet written), in order."""
        return [self.state.get(f"audit/{i}") for i in ids[:MAX_LIST]]

    def audit(self, by: str, key: str | bytes, start: int = 0, limit: int = MAX_LIST,
              upto: int | None = None) -> dict:
        """Audit entries for one user, patient token or image (envelope id), oldest first;
        with ``upto``, only the first ``upto`` of that index."""
        if by not in AUDIT_INDEXES:
            raise KeyError(by)
        prefix = AUDIT_INDEXES[by]
        k = key.hex() if isinstance(key, bytes) else key
        total = self.state.get(f"{prefix}_n/{k}", 0)
        if upto is not None:
            total = min(total, upto)
        ids = [self.state.get(f"{prefix}/{k}/{j}") for j in range(start, min(total, start + min(limit, MAX_LIST)))]
        return {"entries": [self.state.get(f"audit/{i}") for i in ids], "total": total}


# transaction type -> the contract method that applies it (AccessRequested is decided apart)
_HANDLERS = {
    PrincipalSet: Contracts._principal_set,
    DeviceEnrolled: Contracts._device_enrolled,
    DeviceRevoked: Contracts._device_revoked,
    ImageRegistered: Contracts._image_registered,
    ConsentSet: Contracts._consent_set,
    PolicySet: Contracts._policy_set,
    ModelReleased: Contracts._model_released,
    InferenceRecorded: Contracts._inference_recorded,
}
