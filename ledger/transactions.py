"""Ledger transactions: typed frozen dataclasses with one canonical wire form.

A transaction travels inside a principal-signed :class:`ledger.messages.Request` as the map
``{"type": TYPE, field: value, ...}``. :func:`parse` checks every field's type and bounds and
raises :class:`TransactionInvalid` naming the field (never its value: a patient token or key
stays out of errors and logs). Nothing here identifies a patient: patient, study, series and
instance identifiers are the edge's keyed pseudonyms.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ledger.errors import TransactionInvalid

__all__ = [
    "PURPOSES",
    "ROLES_FIELD_LIMIT",
    "Transaction",
    "PrincipalSet",
    "DeviceEnrolled",
    "DeviceRevoked",
    "ImageRegistered",
    "ConsentSet",
    "PolicySet",
    "AccessRequested",
    "AuditRead",
    "READ_QUERIES",
    "ModelReleased",
    "InferenceRecorded",
    "TX_TYPES",
    "parse",
]

PURPOSES = ("diagnosis", "research", "training", "sharing")
ROLES_FIELD_LIMIT = 32
_NAME = 128
_TEXT = 512


def _name(v: Any, limit: int = _NAME) -> bool:
    return isinstance(v, str) and 0 < len(v) <= limit and v.isprintable()


def _text(v: Any) -> bool:
    return isinstance(v, str) and len(v) <= _TEXT


def _nonneg(v: Any) -> bool:
    return type(v) is int and 0 <= v < 2**63


def _hash32(v: Any) -> bool:
    return isinstance(v, bytes) and len(v) == 32


def _envelope_id(v: Any) -> bool:
    return isinstance(v, bytes) and len(v) == 16


def _purpose(v: Any) -> bool:
    return v in PURPOSES


def _purposes(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(set(v)) == len(v) and all(map(_purpose, v))


def _roles_by_purpose(v: Any) -> bool:
    return isinstance(v, dict) and all(
        _purpose(p) and isinstance(roles, (list, tuple)) and len(roles) <= ROLES_FIELD_LIMIT
        and all(_name(r) for r in roles) for p, roles in v.items())


def _metrics(v: Any) -> bool:
    return isinstance(v, dict) and len(v) <= 64 and all(
        _name(k) and isinstance(x, (int, float)) and not isinstance(x, bool)
        and math.isfinite(x) for k, x in v.items())


def _opt_hash32(v: Any) -> bool:
    return v is None or _hash32(v)


def _opt_date(v: Any) -> bool:
    return v is None or (isinstance(v, str) and len(v) == 8 and v.isdigit())


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


_NAMES: dict[type, tuple[str, ...]] = {}


@dataclass(frozen=True, slots=True)
class Transaction:
    TYPE: ClassVar[str] = ""
    CHECKS: ClassVar[dict] = {}

    def to_wire(self) -> dict:
        out = {"type": self.TYPE}
        names = _NAMES.get(type(self))
        if names is None:
            names = _NAMES[type(self)] = tuple(f.name for f in dataclasses.fields(self))
        for name in names:
            value = getattr(self, name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = {k: list(x) if isinstance(x, tuple) else x for k, x in value.items()}
            out[name] = value
        return out


@dataclass(frozen=True, slots=True)
class PrincipalSet(Transaction):
    """Add, re-key, change the role of, or deactivate a principal (operator only).
    ``recipient_key``: the principal's X25519 public key, to which the custodian re-wraps
    the data keys of images granted to it (people fetching images need one)."""

    TYPE: ClassVar[str] = "PRINCIPAL_SET"
    CHECKS: ClassVar[dict] = {"name": _name, "role": _name, "public_key": _hash32,
                              "active": _bool, "recipient_key": _opt_hash32}
    name: str
    role: str
    public_key: bytes
    active: bool = True
    recipient_key: bytes | None = None


@dataclass(frozen=True, slots=True)
class DeviceEnrolled(Transaction):
    TYPE: ClassVar[str] = "DEVICE_ENROLLED"
    CHECKS: ClassVar[dict] = {"device_id": _name, "public_key": _hash32, "site": _name,
                              "group": _name}
    device_id: str
    public_key: bytes
    site: str
    group: str


@dataclass(frozen=True, slots=True)
class DeviceRevoked(Transaction):
    TYPE: ClassVar[str] = "DEVICE_REVOKED"
    CHECKS: ClassVar[dict] = {"device_id": _name, "reason": _text}
    device_id: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ImageRegistered(Transaction):
    """An ingested envelope: integrity proof and pseudonymous identifiers, never pixels."""

    TYPE: ClassVar[str] = "IMAGE_REGISTERED"
    CHECKS: ClassVar[dict] = {
        "envelope_id": _envelope_id, "merkle_root": _hash32, "patient": _name,
        "study_uid": _name, "series_uid": _name, "instance_uid": _name, "modality": _name,
        "consent": _purposes, "policy": _name, "device_id": _name, "sequence": _nonneg,
        "study_date": _opt_date}
    envelope_id: bytes
    merkle_root: bytes
    patient: str
    study_uid: str
    series_uid: str
    instance_uid: str
    modality: str
    consent: tuple[str, ...]
    policy: str
    device_id: str
    sequence: int
    # the de-identified (shifted) study date, YYYYMMDD, when the edge keeps dates shifted
    study_date: str | None = None

    def to_wire(self) -> dict:
        out = Transaction.to_wire(self)
        if out["study_date"] is None:  # the form (and hash) registrations without a date always had
            del out["study_date"]
        return out


@dataclass(frozen=True, slots=True)
class ConsentSet(Transaction):
    """A patient's consent for one purpose, granted or revoked at ``time_ms`` (the time the
    patient decided; contracts order by the agreed block time), optionally expiring."""

    TYPE: ClassVar[str] = "CONSENT_SET"
    CHECKS: ClassVar[dict] = {"patient": _name, "purpose": _purpose, "granted": _bool,
                              "time_ms": _nonneg, "expires_ms": _nonneg}
    patient: str
    purpose: str
    granted: bool
    time_ms: int
    expires_ms: int = 0  # 0: never


@dataclass(frozen=True, slots=True)
class PolicySet(Transaction):
    """The roles allowed per purpose under policy ``policy``."""

    TYPE: ClassVar[str] = "POLICY_SET"
    CHECKS: ClassVar[dict] = {"policy": _name, "allowed": _roles_by_purpose}
    policy: str
    allowed: dict[str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class AccessRequested(Transaction):
    """``user`` asks to ``action`` the image ``envelope_id`` for ``purpose``. Decided by the
    contract and audited whatever the outcome."""

    TYPE: ClassVar[str] = "ACCESS_REQUESTED"
    CHECKS: ClassVar[dict] = {"user": _name, "envelope_id": _envelope_id, "purpose": _purpose,
                              "action": _name}
    user: str
    envelope_id: bytes
    purpose: str
    action: str


READ_QUERIES = {"consent": ("patient",), "audit": ("patient", "image"),
                "studies": ("patient",)}  # query -> keyed by


def _read_query(v: Any) -> bool:
    return v in READ_QUERIES


def _read_by(v: Any) -> bool:
    return v in ("patient", "image")


@dataclass(frozen=True, slots=True)
class AuditRead(Transaction):
    """The submitter asks to read a patient token's history: its consent history
    (``query="consent"``, ``by="patient"``) or its audit trail, by patient token or by one
    of its images (``query="audit"``, ``by="patient"|"image"``; ``key`` is the token or the
    envelope id in hex), or the studies registered for it (``query="studies"``,
    ``by="patient"``: the listing filtered by patient token). Decided by role and audited whatever the outcome; the validators
    answer such a query only when it names a granted read of the asker (docs/access.md)."""

    TYPE: ClassVar[str] = "AUDIT_READ"
    CHECKS: ClassVar[dict] = {"query": _read_query, "by": _read_by, "key": _name}
    query: str
    by: str
    key: str


@dataclass(frozen=True, slots=True)
class ModelReleased(Transaction):
    TYPE: ClassVar[str] = "MODEL_RELEASED"
    CHECKS: ClassVar[dict] = {"model_hash": _hash32, "name": _name, "version": _name,
                              "metrics": _metrics, "manifest_hash": _hash32}
    model_hash: bytes
    name: str
    version: str
    metrics: dict[str, float]
    manifest_hash: bytes


@dataclass(frozen=True, slots=True)
class InferenceRecorded(Transaction):
    """A device's batch of predictions, committed as the Merkle root of its records."""

    TYPE: ClassVar[str] = "INFERENCE_RECORDED"
    CHECKS: ClassVar[dict] = {"batch_root": _hash32, "count": _nonneg, "device_id": _name,
                              "model_hash": _opt_hash32}
    batch_root: bytes
    count: int
    device_id: str
    model_hash: bytes | None = None


TX_TYPES: dict[str, type[Transaction]] = {cls.TYPE: cls for cls in (
    PrincipalSet, DeviceEnrolled, DeviceRevoked, ImageRegistered, ConsentSet, PolicySet,
    AccessRequested, AuditRead, ModelReleased, InferenceRecorded)}


# per type: (field name, check, required) and the set of allowed keys, computed once
_SPECS = {t: ([(f.name, cls.CHECKS[f.name], f.default is dataclasses.MISSING)
               for f in dataclasses.fields(cls)],
              {f.name for f in dataclasses.fields(cls)} | {"type"})
          for t, cls in TX_TYPES.items()}


def parse(wire: Any) -> Transaction:
    """The typed transaction for a wire map, or :class:`TransactionInvalid`."""
    if not isinstance(wire, dict):
        raise TransactionInvalid("transaction must be a map")
    tx_type = wire.get("type")
    spec = _SPECS.get(tx_type) if isinstance(tx_type, str) else None
    if spec is None:
        raise TransactionInvalid("unknown transaction type")
    fields, allowed = spec
    kwargs = {}
    for name, check, required in fields:
        if name not in wire:
            if required:
                raise TransactionInvalid(f"{tx_type}: missing field {name!r}")
            continue
        value = wire[name]
        if not check(value):
            raise TransactionInvalid(f"{tx_type}: field {name!r} is malformed")
        if isinstance(value, list):
            value = tuple(value)
        elif name == "allowed":
            value = {p: tuple(r) for p, r in value.items()}
        kwargs[name] = value
    if len(wire) > len(kwargs) + 1:
        extra = set(wire) - allowed
        if extra:
            raise TransactionInvalid(f"{tx_type}: unknown field(s) {sorted(extra)}")
    return TX_TYPES[tx_type](**kwargs)
