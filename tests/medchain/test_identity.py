"""Key files and signatures: 0600 files, clear refusals, domain-separated signatures."""

import os
import stat

import pytest

from medchain.errors import KeyFileError, SignatureInvalid
from medchain.identity import RecipientKey, SigningKey, VerifyKey, ed25519_valid, encoded_message


def test_signing_key_file_round_trip_is_private(tmp_path):
    key = SigningKey.generate()
    path = key.save(tmp_path / "keys" / "device.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = SigningKey.load(path)
    assert loaded.public == key.public
    sig = loaded.sign("test/v1", {"a": 1})
    key.public.verify("test/v1", {"a": 1}, sig)


def test_recipient_key_file_round_trip(tmp_path):
    key = RecipientKey.generate()
    path = key.save(tmp_path / "custodian.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert RecipientKey.load(path).public == key.public


def test_existing_key_is_never_overwritten(tmp_path):
    path = SigningKey.generate().save(tmp_path / "k")
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        SigningKey.generate().save(path)
    assert path.read_bytes() == before


def test_missing_key_file(tmp_path):
    with pytest.raises(KeyFileError, match="not found"):
        SigningKey.load(tmp_path / "absent.key")


def test_truncated_key_file(tmp_path):
    path = SigningKey.generate().save(tmp_path / "k")
    data = path.read_bytes()
    path.chmod(0o600)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(KeyFileError, match="truncated"):
        SigningKey.load(path)


def test_empty_key_file(tmp_path):
    path = tmp_path / "k"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    with pytest.raises(KeyFileError, match="empty"):
        SigningKey.load(path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_key_readable_by_others_is_refused(tmp_path, mode):
    path = SigningKey.generate().save(tmp_path / "k")
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="too open"):
        SigningKey.load(path)


def test_wrong_key_type_is_refused(tmp_path):
    path = RecipientKey.generate().save(tmp_path / "x25519.key")
    with pytest.raises(KeyFileError, match="expected an Ed25519"):
        SigningKey.load(path)


def test_signature_is_bound_to_domain_and_value():
    key = SigningKey.generate()
    sig = key.sign("medchain/v1/envelope", {"seq": 1})
    with pytest.raises(SignatureInvalid):
        key.public.verify("medchain/v1/other", {"seq": 1}, sig)
    with pytest.raises(SignatureInvalid):
        key.public.verify("medchain/v1/envelope", {"seq": 2}, sig)
    with pytest.raises(SignatureInvalid):
        SigningKey.generate().public.verify("medchain/v1/envelope", {"seq": 1}, sig)
    with pytest.raises(SignatureInvalid):
        key.public.verify("medchain/v1/envelope", {"seq": 1}, sig[:-1] + bytes([sig[-1] ^ 1]))


def test_repr_never_shows_key_material(tmp_path):
    key = SigningKey.generate()
    pem = key.save(tmp_path / "k").read_bytes()
    assert "PRIVATE" not in repr(key) and pem.decode() not in repr(key)
    assert key.public.id in repr(key)


def test_public_key_hex_round_trip():
    pub = SigningKey.generate().public
    assert VerifyKey.from_hex(pub.hex()) == pub
    with pytest.raises(SignatureInvalid):
        VerifyKey(b"\x00" * 31)


def test_encoded_signing_matches_value_signing():
    from medchain.canonical import canonical_bytes

    key = SigningKey.from_seed(bytes(range(32)))
    value = {"n": 3, "d": b"\x01" * 32}
    sig = key.sign_encoded("test/v1", canonical_bytes(value))
    assert sig == key.sign("test/v1", value)  # Ed25519 is deterministic
    key.public.verify("test/v1", value, sig)
    key.public.verify_encoded("test/v1", canonical_bytes(value), sig)
    with pytest.raises(SignatureInvalid):
        key.public.verify_encoded("test/v2", canonical_bytes(value), sig)


def test_ed25519_valid_accepts_exactly_the_signed_bytes():
    # libsodium checks what cryptography (OpenSSL) signed; a signature of the wrong size must
    # not shift into the message (the check concatenates signature and message)
    key = SigningKey.generate()
    encoded = os.urandom(200)
    sig = key.sign_encoded("medchain/v1/test", encoded)
    message = encoded_message("medchain/v1/test", encoded)
    raw = key.public.raw
    assert ed25519_valid(raw, sig, message)
    assert not ed25519_valid(raw, sig, message + b"x")
    assert not ed25519_valid(raw, sig[:-1], sig[-1:] + message)  # 63-byte signature
    assert not ed25519_valid(raw, bytes([sig[0] ^ 1]) + sig[1:], message)
    assert not ed25519_valid(raw[:31], sig, message)
    assert not ed25519_valid(SigningKey.generate().public.raw, sig, message)
    assert not ed25519_valid(raw, bytearray(sig), message)  # only bytes are judged
