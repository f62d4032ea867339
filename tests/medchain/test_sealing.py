"""Sealing: round trips (property) and every tamper the issue names, each refused."""

import dataclasses
import os
import random

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from medchain.identity import RecipientKey, SigningKey
from medchain.merkle import MerkleTree, verify_inclusion
from medchain.errors import DecryptionError, MedChainError, VerificationError
from medchain.protocol import Envelope, decode_message, encode
from medchain.sealing import (
    decrypt_chunk,
    encrypt_chunk,
    open_envelope,
    package,
    new_object_key,
    seal,
    unwrap_key,
    verify,
)

DEVICE = SigningKey.from_seed(b"\x01" * 32)
CUSTODIAN = RecipientKey.generate()


def make(parts, chunk_size=64, **kw):
    return seal(
        parts,
        device_id="edge-1",
        sequence=kw.pop("sequence", 7),
        signer=DEVICE,
        recipient=CUSTODIAN.public,
        created_ms=1_700_000_000_000,
        chunk_size=chunk_size,
        meta=kw.pop("meta", {"modality": "CT"}),
        **kw,
    )


def replace_header(env: Envelope, **changes) -> Envelope:
    return dataclasses.replace(env, header=dataclasses.replace(env.header, **changes))


parts_st = st.dictionaries(
    st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=6),
    st.binary(max_size=700),
    min_size=1,
    max_size=4,
)


@given(parts_st, st.integers(1, 300))
def test_round_trip_through_the_wire(parts, chunk_size):
    env = make(parts, chunk_size=chunk_size)
    wire = encode(env)
    back = decode_message(wire, expect=Envelope)
    assert back == env
    assert open_envelope(back, CUSTODIAN, DEVICE.public) == parts
    assert env.header.merkle_root == MerkleTree([c.digest for c in env.header.chunks]).root


@given(parts_st)
def test_every_chunk_has_an_inclusion_proof_against_the_root(parts):
    env = make(parts)
    digests = [c.digest for c in env.header.chunks]
    tree = MerkleTree(digests)
    for i, digest in enumerate(digests):
        verify_inclusion(env.header.merkle_root, digest, tree.proof(i))


def test_open_selected_parts_only():
    env = make({"dicom": os.urandom(300), "tensor": b"t" * 100, "meta": b"{}"})
    assert open_envelope(env, CUSTODIAN, DEVICE.public, names=["tensor"]) == {"tensor": b"t" * 100}
    with pytest.raises(KeyError):
        open_envelope(env, CUSTODIAN, DEVICE.public, names=["nope"])


def test_empty_part_round_trips():
    env = make({"empty": b"", "x": b"x"})
    assert open_envelope(env, CUSTODIAN, DEVICE.public) == {"empty": b"", "x": b"x"}


def test_deterministic_given_rng():
    def rng_from(seed):
        r = random.Random(seed)
        return lambda n: r.randbytes(n)

    a = package({"p": b"x" * 500}, new_object_key(CUSTODIAN.public, rng_from(1)), device_id="d",
                sequence=1, signer=DEVICE, created_ms=5, rng=rng_from(2))
    b = package({"p": b"x" * 500}, dataclasses.replace(new_object_key(CUSTODIAN.public, rng_from(1)),
                wrapped_key=a.header.wrapped_key), device_id="d", sequence=1, signer=DEVICE,
                created_ms=5, rng=rng_from(2))
    assert encode(a) == encode(b)


# -- tampering ------------------------------------------------------------------------------

PAYLOAD = {"dicom": bytes(range(256)) * 3, "tensor": b"\x07" * 200}


@pytest.fixture
def env():
    return make(PAYLOAD)


def test_swapped_chunks_are_refused(env):
    bodies = list(env.bodies)
    bodies[0], bodies[1] = bodies[1], bodies[0]
    with pytest.raises(VerificationError, match="chunk 0 does not match"):
        verify(dataclasses.replace(env, bodies=tuple(bodies)), DEVICE.public)


def test_swapped_chunks_with_their_table_rows_break_the_signature(env):
    bodies, chunks = list(env.bodies), list(env.header.chunks)
    bodies[0], bodies[1] = bodies[1], bodies[0]
    chunks[0], chunks[1] = chunks[1], chunks[0]
    swapped = replace_header(dataclasses.replace(env, bodies=tuple(bodies)), chunks=tuple(chunks))
    with pytest.raises(VerificationError, match="signature"):
        verify(swapped, DEVICE.public)


def test_aad_binds_index_count_and_object():
    """Below the signature, AES-GCM itself refuses a chunk moved anywhere else."""
    key = AESGCM(AESGCM.generate_key(256))
    oid, other, nonce = b"o" * 16, b"p" * 16, os.urandom(12)
    body = encrypt_chunk(key, oid, 1, 3, nonce, b"secret pixels")
    assert decrypt_chunk(key, oid, 1, 3, nonce, body) == b"secret pixels"
    for args in [(oid, 0, 3), (oid, 1, 2), (oid, 1, 4), (other, 1, 3)]:
        with pytest.raises(DecryptionError):
            decrypt_chunk(key, *args, nonce, body)


def test_truncated_ciphertext_is_refused(env):
    bodies = list(env.bodies)
    bodies[2] = bodies[2][:-1]
    with pytest.raises(VerificationError):
        verify(dataclasses.replace(env, bodies=tuple(bodies)), DEVICE.public)
    with pytest.raises(MedChainError):  # and on the wire the parser already says so
        decode_message(encode(dataclasses.replace(env, bodies=tuple(bodies))))


def test_dropped_chunk_is_refused(env):
    with pytest.raises(MedChainError):
        verify(dataclasses.replace(env, bodies=env.bodies[:-1]), DEVICE.public)


def test_flipped_ciphertext_bit_is_refused(env):
    bodies = list(env.bodies)
    bodies[1] = bytes([bodies[1][0] ^ 0x80]) + bodies[1][1:]
    with pytest.raises(VerificationError, match="chunk 1"):
        verify(dataclasses.replace(env, bodies=tuple(bodies)), DEVICE.public)


def test_wrong_key_cannot_open(env):
    wrong = dataclasses.replace(new_object_key(CUSTODIAN.public), object_id=env.header.object_id)
    # a header re-signed by the device but carrying another object's wrapped key
    forged = package(PAYLOAD, wrong, device_id="edge-1", sequence=7, signer=DEVICE, created_ms=0)
    mixed = dataclasses.replace(forged, bodies=env.bodies)
    with pytest.raises(VerificationError):
        open_envelope(mixed, CUSTODIAN, DEVICE.public)
    with pytest.raises(DecryptionError):  # the data key of one object does not open another
        aead = AESGCM(unwrap_key(forged.header.wrapped_key, forged.header.object_id, CUSTODIAN))
        decrypt_chunk(aead, env.header.object_id, 0, len(env.bodies), env.header.chunks[0].nonce, env.bodies[0])


def test_wrong_recipient_cannot_open(env):
    other = RecipientKey.generate()
    with pytest.raises(DecryptionError, match="another recipient"):
        open_envelope(env, other, DEVICE.public)
    with pytest.raises(DecryptionError, match="failed to unwrap"):
        unwrap_key(env.header.wrapped_key, env.header.object_id, other)


def test_wrapped_key_is_bound_to_its_object(env):
    with pytest.raises(DecryptionError):
        unwrap_key(env.header.wrapped_key, b"\x00" * 16, CUSTODIAN)


def test_modified_signature_is_refused(env):
    sig = bytearray(env.signature)
    sig[10] ^= 1
    with pytest.raises(VerificationError, match="signature"):
        verify(dataclasses.replace(env, signature=bytes(sig)), DEVICE.public)


def test_signature_from_another_device_is_refused(env):
    with pytest.raises(VerificationError, match="signature"):
        verify(env, SigningKey.generate().public)


@pytest.mark.parametrize(
    "change",
    [
        {"sequence": 8},
        {"device_id": "edge-2"},
        {"created_ms": 1},
        {"meta": {"modality": "MR"}},
        {"recipient": "0" * 32},
        {"merkle_root": b"\x00" * 32},
        {"object_id": b"\x00" * 16},
    ],
    ids=lambda c: next(iter(c)),
)
def test_modified_header_is_refused(env, change):
    with pytest.raises(VerificationError):
        verify(replace_header(env, **change), DEVICE.public)


def test_failures_never_leak_key_material(env):
    key = unwrap_key(env.header.wrapped_key, env.header.object_id, CUSTODIAN)
    bodies = list(env.bodies)
    bodies[0] = b"\x00" * len(bodies[0])
    bad = dataclasses.replace(env, bodies=tuple(bodies))
    with pytest.raises(MedChainError) as info:
        open_envelope(bad, CUSTODIAN, DEVICE.public)
    assert key.hex() not in str(info.value) and repr(key) not in str(info.value)
    assert "data_key" not in repr(new_object_key(CUSTODIAN.public)).lower().replace("object_id", "")
