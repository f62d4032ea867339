"""Protocol v1 parsing: what is wrong is said, and nothing malformed gets through."""

import re

import pytest

from medchain.canonical import canonical_bytes
from medchain.errors import ProtocolError
from medchain.identity import RecipientKey, SigningKey
from medchain.protocol import (
    VERSION,
    Envelope,
    ack_topic,
    decode_message,
    encode,
    envelope_topic,
)
from medchain.sealing import seal

ENV = seal(
    {"p": b"pixels" * 50},
    device_id="edge-1",
    sequence=3,
    signer=SigningKey.generate(),
    recipient=RecipientKey.generate().public,
    created_ms=0,
    chunk_size=100,
)


def wire() -> dict:
    msg = ENV.to_wire()
    msg.update(v=VERSION, type="envelope")
    return msg


def test_encoding_is_binary_safe_and_compact():
    data = encode(ENV)
    assert data.count(ENV.bodies[0]) == 1  # ciphertext is carried as raw bytes
    assert len(data) < ENV.size + 200 * len(ENV.bodies) + 400


def test_topics_are_versioned():
    assert envelope_topic("edge-1") == "medchain/v1/devices/edge-1/envelopes"
    assert ack_topic("edge-1") == "medchain/v1/devices/edge-1/acks"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m.update(v=2), "unsupported protocol version, expected 1"),
        (lambda m: m.update(v=True), "unsupported protocol version"),
        (lambda m: m.pop("v"), "unsupported protocol version"),
        (lambda m: m.update(type="nope"), "unknown type"),
        (lambda m: m.update(type=["envelope"]), "unknown type"),
        (lambda m: m["header"].pop("sequence"), "field 'header.sequence' is missing"),
        (lambda m: m["header"].update(sequence="1"), "'header.sequence' must be an integer >= 0"),
        (lambda m: m["header"].update(sequence=True), "'header.sequence' must be an integer"),
        (lambda m: m["header"].update(sequence=-1), "'header.sequence' must be an integer >= 0"),
        (lambda m: m["header"].update(merkle_root=b"x"), "'header.merkle_root' must be 32 bytes"),
        (lambda m: m["header"]["chunks"][0].update(nonce=b"n"),
         "field 'header.chunks[0].nonce' must be 12 bytes"),
        (lambda m: m["header"]["chunks"][0].update(extra=1),
         "'header.chunks[0]' has unknown field"),
        (lambda m: m["header"]["parts"][0].update(count=1), "parts do not cover the chunk table"),
        (lambda m: m["header"].update(parts=[]), "no parts"),
        (lambda m: m["header"].update(sealed_meta={"patient": "x"}),
         "'header.sealed_meta' must be a byte string"),
        (lambda m: m["header"].update(meta={"patient": "x"}), "'header' has unknown field(s) 'meta'"),
        (lambda m: m.update(bodies=m["bodies"][:-1]), "'bodies' must hold one body per chunk"),
        (lambda m: m["bodies"].__setitem__(0, m["bodies"][0][:-3]),
         "'bodies[0]' is not the length"),
        (lambda m: m.update(header=[1, 2]), "field 'header' must be a map"),
        (lambda m: m.update(extra=1), "envelope: has unknown field(s) 'extra'"),
    ],
)
def test_parse_errors_say_what_is_wrong(mutate, message):
    msg = wire()
    mutate(msg)
    with pytest.raises(ProtocolError, match=re.escape(message)):
        decode_message(canonical_bytes(msg, check=False))


def test_garbage_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="not a protocol message"):
        decode_message(b"\xff\x00garbage")
    with pytest.raises(ProtocolError, match="expected a map"):
        decode_message(canonical_bytes([1, 2, 3]))


def test_expecting_a_type():
    assert decode_message(encode(ENV), expect=Envelope) == ENV
