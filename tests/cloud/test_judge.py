"""The ingest decision, as a pure function: every refusal has its reason."""

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from cloud.catalog import CatalogEntry, Receipt
from cloud.ingest import DeviceRecord, Verdict, judge
from medchain.identity import RecipientKey, SigningKey
from medchain.protocol import AckStatus
from medchain.sealing import seal

KEY, CUSTODIAN = SigningKey.generate(), RecipientKey.generate()
DEVICE = DeviceRecord("edge-1", KEY.public)


def env(seq=1, data=b"x" * 100, key=KEY, device_id="edge-1"):
    return seal({"dicom": data}, device_id=device_id, sequence=seq, signer=key,
                recipient=CUSTODIAN.public, created_ms=0)


def prior_of(e):
    return CatalogEntry(e.envelope_id, "edge-1", e.header.sequence, "", 0, 0, Receipt(7, 2), {})


def test_a_good_envelope_is_accepted():
    assert judge(env(), "edge-1", DEVICE, None, None).status == Verdict.ACCEPT


def test_unknown_devices_are_dropped_and_revoked_ones_rejected():
    v = judge(env(), "edge-1", None, None, None)
    assert v.status == Verdict.DROP and v.reason == "unknown device 'edge-1'"
    revoked = dataclasses.replace(DEVICE, revoked=True)
    v = judge(env(), "edge-1", revoked, None, None)
    assert v.status == AckStatus.REJECTED and v.reason == "device 'edge-1' is revoked"


def test_envelope_naming_another_device_on_its_own_topic():
    other = DeviceRecord("edge-2", KEY.public)  # edge-2's topic, signed with edge-2's key, names edge-1
    v = judge(env(), "edge-2", other, None, None)
    assert v.status == AckStatus.REJECTED and "topic" in v.reason


def test_signed_by_someone_else_earns_no_ack():
    """Before this change (c1ffc7f) this got a signed ``rejected`` ack under the envelope id
    the forger chose, and the device gave up its own envelope of that id for good."""
    v = judge(env(key=SigningKey.generate()), "edge-1", DEVICE, None, None)
    assert v.status == Verdict.DROP and "signature" in v.reason


@given(st.integers(0, 10_000), st.data())
def test_any_tampered_chunk_is_rejected(position, data):
    e = env(data=bytes(range(256)) * 4)
    i = data.draw(st.integers(0, len(e.bodies) - 1))
    body = bytearray(e.bodies[i])
    body[position % len(body)] ^= 1 << data.draw(st.integers(0, 7))
    bodies = list(e.bodies)
    bodies[i] = bytes(body)
    v = judge(dataclasses.replace(e, bodies=tuple(bodies)), "edge-1", DEVICE, None, None)
    assert v.status == Verdict.DROP and f"chunk {i}" in v.reason  # tampered on the way: resent


def test_replay_is_a_duplicate_with_the_original_receipt():
    e = env()
    v = judge(e, "edge-1", DEVICE, prior_of(e), e.envelope_id)
    assert v.status == AckStatus.DUPLICATE and v.receipt == Receipt(7, 2)


def test_a_reused_sequence_number_is_rejected():
    first, second = env(seq=5), env(seq=5)
    v = judge(second, "edge-1", DEVICE, None, first.envelope_id)
    assert v.status == AckStatus.REJECTED and "sequence 5 was already used" in v.reason


def test_a_forgery_never_earns_a_duplicate_ack():
    e = env()
    forged = env(key=SigningKey.generate())
    forged = dataclasses.replace(forged, header=dataclasses.replace(forged.header, object_id=e.header.object_id))
    assert judge(forged, "edge-1", DEVICE, prior_of(e), e.envelope_id).status == Verdict.DROP
