"""Golden messages: the exact bytes of every protocol v1 message, recorded once.

Any change to the wire format fails here. Signatures are real, from fixed seeds, and the
envelope is packaged with a fixed key and counter nonces (its sealed metadata is fixed bytes:
HPKE is randomized). The hex lives in ``golden_protocol.json``; it was written from the
hand-written codec and must not be regenerated to make a change pass. It was re-recorded
once, for the deliberate changes of issue 17 (acks name the signed header's hash, offers a
release sequence, envelope metadata is sealed, enrolment names the metadata key), and only
for the messages those changed.
"""

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path

import pytest

from medchain.identity import SigningKey
from medchain.protocol import (
    ENVELOPE_SIGNING_DOMAIN,
    MESSAGE_TYPES,
    Ack,
    AckStatus,
    Enrollment,
    Heartbeat,
    ModelOffer,
    ModelRelease,
    ModelState,
    ModelStatus,
    OfferStage,
    decode_message,
    encode,
    fragment,
)
from medchain.sealing import ObjectKey, package

GOLDEN = json.loads((Path(__file__).with_name("golden_protocol.json")).read_text())
DEVICE = SigningKey.from_seed(b"\x01" * 32)
INGEST = SigningKey.from_seed(b"\x02" * 32)
TRAINER = SigningKey.from_seed(b"\x03" * 32)


def counter_rng():
    count = itertools.count()
    return lambda n: hashlib.sha256(next(count).to_bytes(8, "big")).digest()[:n]


def envelope(sealed_meta: bytes):
    key = ObjectKey(b"\x10" * 16, b"\x20" * 32, b"\x30" * 48, "custodian-1")
    env = package({"dicom": b"D" * 250, "meta": b"{}"}, key, device_id="edge-1", sequence=9,
                  signer=DEVICE, created_ms=1_700_000_000_000,
                  media_types={"dicom": "application/dicom"}, chunk_size=100,
                  rng=counter_rng())
    header = dataclasses.replace(env.header, sealed_meta=sealed_meta)
    return dataclasses.replace(env, header=header,
                               signature=DEVICE.sign(ENVELOPE_SIGNING_DOMAIN, header.to_wire()))


ONNX, CARD = b"onnx-bytes" * 10, b'{"name": "m"}'
RELEASE = ModelRelease("triage", "1.2.0", hashlib.sha256(ONNX).digest(),
                       hashlib.sha256(CARD).digest(), TRAINER.public.id, 1_700_000_000_500,
                       ONNX, CARD).signed(TRAINER)
MODEL_HASH = RELEASE.model_hash

SAMPLES = {
    "envelope": envelope(b"\x51" * 80),
    "envelope_no_meta": envelope(b""),
    "ack_stored": Ack("10" * 16, b"\x11" * 32, "edge-1", 9, AckStatus.STORED, ledger_height=12,
                      tx_index=3, sent_ms=1_700_000_000_100).signed(INGEST),
    "ack_rejected": Ack("10" * 16, b"\x11" * 32, "edge-1", 9, AckStatus.REJECTED, "bad signature")
    .signed(INGEST),
    "heartbeat": Heartbeat("edge-1", 1_700_000_000_200, 4, 10_000, 2**40, "1.2.0", "degraded")
    .signed(DEVICE),
    "heartbeat_defaults": Heartbeat("edge-1", 0, 0, 0, 0).signed(DEVICE),
    "model_release": RELEASE,
    "model_release_receipt": ModelRelease(
        RELEASE.name, RELEASE.version, RELEASE.model_hash, RELEASE.card_hash, RELEASE.key_id,
        RELEASE.released_ms, ONNX, CARD, {"record": {"height": 4}, "request": b"\x01\x02",
                                          "cert": None}, RELEASE.signature),
    "model_offer": ModelOffer("edge-1", "ward-3", MODEL_HASH, "1.2.0", OfferStage.CANARY,
                              1_700_000_000_300, 4).signed(INGEST),
    "model_status": ModelStatus("edge-1", MODEL_HASH, "1.2.0", ModelState.REFUSED,
                                "smoke test failed", "1.1.0", 1_700_000_000_400).signed(DEVICE),
}
FRAGMENTS = fragment(b"\x77" * 16, encode(SAMPLES["envelope"]), 400)
ENROLLMENT = Enrollment("edge-1", DEVICE.public.raw, INGEST.public.raw, b"\x04" * 32,
                        b"\x07" * 32, TRAINER.public.raw, 1_700_000_000_000,
                        (b"\x05" * 32, b"\x06" * 32))


def test_every_type_has_a_golden_message():
    assert {type(m).TYPE for m in SAMPLES.values()} | {"fragment"} == set(MESSAGE_TYPES)
    assert set(GOLDEN) == set(SAMPLES) | {"fragments", "enrollment_json"}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_encoding_is_byte_for_byte_the_recorded_one(name):
    assert encode(SAMPLES[name]).hex() == GOLDEN[name]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_recorded_messages_decode_to_the_same_message(name):
    msg = decode_message(bytes.fromhex(GOLDEN[name]))
    assert msg == SAMPLES[name]
    assert encode(msg).hex() == GOLDEN[name]


def test_fragments_are_byte_for_byte_the_recorded_ones():
    assert len(FRAGMENTS) > 2
    assert [f.hex() for f in FRAGMENTS] == GOLDEN["fragments"]
    for data in FRAGMENTS:
        assert encode(decode_message(data)) == data


def test_enrollment_file_is_the_recorded_one():
    assert ENROLLMENT.to_json() == GOLDEN["enrollment_json"]
    assert Enrollment.from_json(GOLDEN["enrollment_json"]) == ENROLLMENT


def test_an_enrollment_file_without_validators_still_reads():
    older = json.loads(GOLDEN["enrollment_json"])
    del older["validators"]
    got = Enrollment.from_json(json.dumps(older))
    assert got.validators == () and got.device_key == ENROLLMENT.device_key


def test_signatures_verify_over_the_recorded_bodies():
    for name, key in (("ack_stored", INGEST), ("heartbeat", DEVICE), ("model_release", TRAINER),
                      ("model_offer", INGEST), ("model_status", DEVICE)):
        decode_message(bytes.fromhex(GOLDEN[name])).verify(key.public)
