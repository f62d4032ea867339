"""Sealing: round trips (property) and every tamper the issue names, each refused."""

import dataclasses
import os
import random

import cbor2
import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from medchain.canonical import canonical_bytes
from medchain.identity import RecipientKey, SigningKey
from medchain.merkle import MerkleTree, verify_inclusion
from medchain.errors import DecryptionError, MedChainError, VerificationError
from medchain.protocol import Envelope, decode_message, encode
from medchain.sealing import (
    decrypt_chunk,
    encrypt_chunk,
    open_envelope,
    open_meta,
    package,
    new_object_key,
    seal,
    unwrap_key,
    verify,
)

DEVICE = SigningKey.from_seed(b"\x01" * 32)
CUSTODIAN = RecipientKey.generate()
META = RecipientKey.generate()
META_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


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
        meta_recipient=META.public,
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


# -- sealed metadata -------------------------------------------------------------------------

meta_st = st.dictionaries(st.text(max_size=8), st.none() | st.booleans() | st.integers()
                          | st.text(max_size=20) | st.lists(st.integers(), max_size=3), max_size=6)


@given(meta_st)
def test_metadata_is_sealed_and_opens_to_what_was_put_in(meta):
    env = make({"dicom": b"d"}, meta=meta)
    assert open_meta(env.header, META) == meta
    if meta:
        assert env.header.sealed_meta and canonical_bytes(meta) not in encode(env)


def test_metadata_is_not_in_clear_text_anywhere_in_the_envelope():
    env = make({"dicom": b"d"}, meta={"patient_token": "tok-7f3a9c", "consent": {"research": True}})
    wire = encode(env)
    assert b"tok-7f3a9c" not in wire and b"research" not in wire and b"consent" not in wire


def test_metadata_opens_only_with_the_ingest_key(env):
    with pytest.raises(DecryptionError, match="failed to open"):
        open_meta(env.header, CUSTODIAN)  # the custodian's key is not the metadata key


def test_metadata_is_bound_to_its_object_and_device(env):
    """Sealed metadata copied into another envelope (another object, another device) does not
    open: a device cannot pass another's consent off as its own."""
    other = make({"x": b"x"}, sequence=9)
    moved = replace_header(other, sealed_meta=env.header.sealed_meta)
    with pytest.raises(DecryptionError):
        open_meta(moved.header, META)
    with pytest.raises(DecryptionError):
        open_meta(replace_header(env, device_id="edge-2").header, META)


def test_metadata_that_is_not_a_map_is_refused(env):
    for plain in ([1, 2], {1: "x"}, {"t": float("nan")}):
        sealed = META_SUITE.encrypt(cbor2.dumps(plain), META.public.to_crypto(),
                                    info=canonical_bytes(["medchain/v1/envelope-meta",
                                                          env.header.object_id, "edge-1"]))
        with pytest.raises(DecryptionError, match="not a map of plain values"):
            open_meta(replace_header(env, sealed_meta=sealed).header, META)


def test_metadata_needs_a_recipient():
    with pytest.raises(ValueError, match="recipient"):
        seal({"d": b"d"}, device_id="d", sequence=1, signer=DEVICE, recipient=CUSTODIAN.public,
             created_ms=0, meta={"a": 1})


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
        {"sealed_meta": b"other"},
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
