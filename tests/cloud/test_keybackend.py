"""The custodian key behind its backends: a key file, and a real PKCS#11 token (SoftHSM2,
initialised in the test's own folder through ``SOFTHSM2_CONF``)."""

from __future__ import annotations

import pytest

from cloud.errors import KeyBackendError
from cloud.keybackend import FileKeyBackend, Pkcs11KeyBackend, Pkcs11Settings, provision_pkcs11
from medchain.errors import DecryptionError, KeyFileError
from medchain.identity import RecipientKey, RecipientPublicKey, SigningKey, write_secret_file
from medchain.sealing import open_envelope, seal

DEVICE = SigningKey.generate()


def sealed_for(public: RecipientPublicKey, data: bytes = b"pixels"):
    return seal({"dicom": data}, recipient=public, device_id="dev", sequence=1, signer=DEVICE,
                created_ms=0)


def test_the_file_backend_opens_what_is_sealed_today(tmp_path):
    key = RecipientKey.generate()
    key.save(tmp_path / "custodian.key")
    with FileKeyBackend(tmp_path / "custodian.key") as backend:
        assert backend.public == key.public and "custodian.key" not in repr(backend)
        env = sealed_for(key.public)
        assert open_envelope(env, backend, DEVICE.public) == {"dicom": b"pixels"}
        with pytest.raises(DecryptionError):
            open_envelope(sealed_for(RecipientKey.generate().public), backend, DEVICE.public)


def test_a_public_key_file_refuses_to_be_a_private_one(tmp_path):
    key = RecipientKey.generate()
    key.public.save(tmp_path / "custodian.pub")
    assert RecipientPublicKey.load(tmp_path / "custodian.pub") == key.public
    key.save(tmp_path / "custodian.key")
    with pytest.raises(KeyFileError, match="private key"):
        RecipientPublicKey.load(tmp_path / "custodian.key")


def test_a_token_key_round_trips_through_softhsm(softhsm_token):
    """Provision in a real token, seal for its public key as a device does (X25519 HPKE,
    unchanged format and key id), open through the token; a copy of the wrapped key file
    with a wrong PIN, or with another token, opens nothing."""
    softhsm = softhsm_token("round-trip")
    public = provision_pkcs11(softhsm)
    assert softhsm.wrapped.stat().st_mode & 0o077 == 0
    env = sealed_for(public, b"pixels from the edge")
    assert env.header.recipient == public.id
    with Pkcs11KeyBackend(softhsm) as backend:
        assert backend.public == public
        assert open_envelope(env, backend, DEVICE.public) == {"dicom": b"pixels from the edge"}
    with pytest.raises(KeyBackendError, match="already holds"):
        provision_pkcs11(softhsm)

    wrong_pin = softhsm.pin_file.with_name("wrong-pin-round-trip")
    write_secret_file(wrong_pin, b"9999")
    with pytest.raises(KeyBackendError):
        Pkcs11KeyBackend(Pkcs11Settings(softhsm.module, softhsm.token, wrong_pin, softhsm.wrapped,
                                        softhsm.key_label))
    # the wrapped file itself holds no usable key: its bytes are not the private key's
    raw = softhsm.wrapped.read_bytes()
    assert public.raw in raw  # the public half is recorded; the private half only sealed


def test_a_key_wrapped_by_another_token_key_is_refused(softhsm_token):
    softhsm, other = softhsm_token("mine"), softhsm_token("another")
    provision_pkcs11(softhsm)
    provision_pkcs11(other)
    swapped = Pkcs11Settings(softhsm.module, softhsm.token, softhsm.pin_file, other.wrapped)
    with pytest.raises(KeyBackendError, match="did not unwrap"):
        Pkcs11KeyBackend(swapped)
