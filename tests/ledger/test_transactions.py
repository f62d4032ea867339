"""Transactions: one wire form per type, every field checked, errors that name the field."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from medchain.canonical import canonical_bytes
from ledger.errors import TransactionInvalid
from ledger.transactions import (
    PURPOSES,
    TX_TYPES,
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
    parse,
)

H = b"\x01" * 32
E = b"\x02" * 16
SAMPLES = [
    PrincipalSet("dr-x", "clinician", H),
    DeviceEnrolled("dev-1", H, "site-a", "ct-room"),
    DeviceRevoked("dev-1", "stolen"),
    ImageRegistered(E, H, "tok", "st", "se", "in", "CT", ("diagnosis", "training"), "default",
                    "dev-1", 3),
    ConsentSet("tok", "research", True, 1000, 2000),
    PolicySet("default", {"diagnosis": ("clinician",), "sharing": ()}),
    AccessRequested("dr-x", E, "diagnosis", "view"),
    AuditRead("consent", "patient", "tok"),
    AuditRead("audit", "image", E.hex()),
    ModelReleased(H, "hybrid", "1.0", {"auc": 0.91, "n": 524}, H),
    InferenceRecorded(H, 17, "dev-1", None),
    InferenceRecorded(H, 17, "dev-1", H),
]


def test_every_type_has_a_sample():
    assert {type(t) for t in SAMPLES} == set(TX_TYPES.values())


@pytest.mark.parametrize("tx", SAMPLES, ids=lambda t: t.TYPE)
def test_round_trip_through_canonical_cbor(tx):
    from medchain.canonical import decode

    assert parse(decode(canonical_bytes(tx.to_wire()))) == tx


@pytest.mark.parametrize("wire, field", [
    ({"type": "DEVICE_ENROLLED", "device_id": "d", "public_key": b"short", "site": "s",
      "group": "g"}, "public_key"),
    ({"type": "DEVICE_ENROLLED", "device_id": "", "public_key": H, "site": "s", "group": "g"},
     "device_id"),
    ({"type": "DEVICE_ENROLLED", "public_key": H, "site": "s", "group": "g"}, "device_id"),
    ({"type": "CONSENT_SET", "patient": "t", "purpose": "marketing", "granted": True,
      "time_ms": 1}, "purpose"),
    ({"type": "CONSENT_SET", "patient": "t", "purpose": "research", "granted": 1,
      "time_ms": 1}, "granted"),
    ({"type": "CONSENT_SET", "patient": "t", "purpose": "research", "granted": True,
      "time_ms": -1}, "time_ms"),
    ({"type": "IMAGE_REGISTERED", **{k: v for k, v in SAMPLES[3].to_wire().items()
                                     if k != "type"}, "consent": ["diagnosis", "diagnosis"]},
     "consent"),
    ({"type": "POLICY_SET", "policy": "p", "allowed": {"diagnosis": "clinician"}}, "allowed"),
    ({"type": "MODEL_RELEASED", "model_hash": H, "name": "m", "version": "1",
      "metrics": {"auc": float("nan")}, "manifest_hash": H}, "metrics"),
    ({"type": "ACCESS_REQUESTED", "user": "u", "envelope_id": H, "purpose": "diagnosis",
      "action": "view"}, "envelope_id"),
    ({"type": "DEVICE_REVOKED", "device_id": "d", "reason": "r", "extra": 1}, "unknown field"),
])
def test_malformed_fields_are_named(wire, field):
    with pytest.raises(TransactionInvalid, match=field):
        parse(wire)


@pytest.mark.parametrize("wire", [None, [], {"type": "DROP_TABLES"}, {"no": "type"}])
def test_unknown_or_untyped_transactions_are_refused(wire):
    with pytest.raises(TransactionInvalid):
        parse(wire)


def test_errors_never_echo_values():
    secret = "patient-name-that-must-not-leak"
    with pytest.raises(TransactionInvalid) as info:
        parse({"type": "CONSENT_SET", "patient": secret, "purpose": "nope", "granted": True,
               "time_ms": 1})
    assert secret not in str(info.value)


@given(purposes=st.lists(st.sampled_from(PURPOSES), unique=True),
       seq=st.integers(0, 2**62), name=st.text(min_size=1, max_size=40).filter(str.isprintable))
def test_image_registration_round_trips_for_any_valid_fields(purposes, seq, name):
    tx = ImageRegistered(E, H, name, name, name, name, "MR", tuple(purposes), "default", name, seq)
    assert parse(tx.to_wire()) == tx
