"""Protocol v1 parsing: what is wrong is said, and nothing malformed gets through."""

import pytest

from medchain.canonical import canonical_bytes
from medchain.identity import RecipientKey, SigningKey
from medchain.errors import ProtocolError
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
        (lambda m: m.update(v=2), "unsupported protocol version 2"),
        (lambda m: m.pop("v"), "unsupported protocol version None"),
        (lambda m: m.update(type="nope"), "unknown type 'nope'"),
        (lambda m: m["header"].pop("sequence"), "missing field 'sequence'"),
        (lambda m: m["header"].update(sequence="1"), "'sequence' must be int, got str"),
        (lambda m: m["header"].update(sequence=True), "'sequence' must be int, got bool"),
        (lambda m: m["header"].update(sequence=-1), "'sequence' must be >= 0"),
        (lambda m: m["header"].update(merkle_root=b"x"), "'merkle_root' must be 32 bytes"),
        (lambda m: m["header"]["chunks"][0].update(nonce=b"n"), "chunks[0]: field 'nonce' must be 12 bytes"),
        (lambda m: m["header"]["parts"][0].update(count=1), "parts cover 1 chunks"),
        (lambda m: m["header"].update(parts=[]), "no parts"),
        (lambda m: m.update(bodies=m["bodies"][:-1]), "bodies for"),
        (lambda m: m["bodies"].__setitem__(0, m["bodies"][0][:-3]), "bodies[0] is"),
        (lambda m: m.update(header=[1, 2]), "expected a map"),
    ],
)
def test_parse_errors_say_what_is_wrong(mutate, message):
    msg = wire()
    mutate(msg)
    with pytest.raises(ProtocolError, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode_message(canonical_bytes(msg))


def test_garbage_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="not a protocol message"):
        decode_message(b"\xff\x00garbage")
    with pytest.raises(ProtocolError, match="expected a map"):
        decode_message(canonical_bytes([1, 2, 3]))


def test_expecting_a_type():
    assert decode_message(encode(ENV), expect=Envelope) == ENV
