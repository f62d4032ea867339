"""Where the custodian's X25519 key lives: a key file, or a PKCS#11 token.

A backend offers the custodian key's public half and ``unwrap(wrapped, object_id)`` (the
HPKE open of an envelope's wrapped data key, :func:`medchain.sealing.unwrap_key`), and
nothing else: no caller is handed the private key. Only the custodian process opens one.

* :class:`FileKeyBackend`: the key in a PEM file (mode 0600) on the custodian's host.
* :class:`Pkcs11KeyBackend`: the key kept encrypted under an AES-256 key that never leaves
  a PKCS#11 token (``SENSITIVE``, not ``EXTRACTABLE``); the token decrypts it (``CKM_AES_GCM``,
  associated data binding the public key) when the custodian starts, after the PIN.

Why the token does not do the X25519 itself: envelopes wrap data keys with HPKE
DHKEM(X25519) and devices already hold that public key. SoftHSM2 2.6 (and many HSMs) offer
``CKM_ECDH1_DERIVE`` on Weierstrass curves only: no ``CKK_EC_MONTGOMERY`` and no
``CKM_EC_MONTGOMERY_KEY_PAIR_GEN``. A P-256 key in the token would need the HPKE key
schedule computed around the token's raw ECDH output: crypto of our own, which we do not
write (``cryptography``'s HPKE opens only with a private key object it holds). So the token
guards the key at rest and by PIN: a copy of the custodian's disk, its backups or the
wrapped key file decrypt nothing without the token; the key is in the custodian process's
memory while it runs (see docs/security.md, "The custodian apart"). The wrapped key file
keeps the format of envelopes and enrolments unchanged: the recipient key id stays that of
the X25519 public key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from medchain.canonical import canonical_bytes, decode
from medchain.errors import EncodingError, KeyFileError
from medchain.identity import RecipientKey, RecipientPublicKey, read_secret_file, write_secret_file
from medchain.sealing import unwrap_key

from cloud.errors import KeyBackendError

__all__ = ["KeyBackend", "FileKeyBackend", "Pkcs11KeyBackend", "Pkcs11Settings", "open_backend",
           "provision_pkcs11", "DEFAULT_KEY_LABEL"]

DEFAULT_KEY_LABEL = "medchain-custodian"
_FORMAT = "medchain/v1/custodian-key-pkcs11-aes-gcm"
_NONCE = 12


class KeyBackend:
    """The custodian key behind an interface: its public half, and data-key unwrapping."""

    public: RecipientPublicKey

    def unwrap(self, wrapped: bytes, object_id: bytes) -> bytes:
        """The data key of ``object_id``; :class:`DecryptionError` if not sealed for us."""
        raise NotImplementedError

    def close(self) -> None:
        """Forget the key."""

    def __enter__(self) -> KeyBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:  # never show key material
        return f"{type(self).__name__}(id={self.public.id})"


class _InMemory(KeyBackend):
    def __init__(self, key: RecipientKey):
        self._key: RecipientKey | None = key
        self.public = key.public

    def unwrap(self, wrapped: bytes, object_id: bytes) -> bytes:
        if self._key is None:
            raise KeyBackendError(f"custodian key {self.public.id}: backend closed")
        return unwrap_key(wrapped, object_id, self._key)

    def close(self) -> None:
        self._key = None


class FileKeyBackend(_InMemory):
    """The custodian key in a PEM file of the custodian's own (mode 0600)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(RecipientKey.load(path))


@dataclass(frozen=True)
class Pkcs11Settings:
    """A token and the custodian key's file wrapped by it. ``pin_file``: mode 0600."""

    module: Path  # the PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so
    token: str  # the token label
    pin_file: Path
    wrapped: Path  # the custodian key, encrypted by the token's AES key
    key_label: str = DEFAULT_KEY_LABEL


def _open_token(settings: Pkcs11Settings):
    try:
        import pkcs11  # noqa: PLC0415 - optional: only a deployment with a token needs it
    except ImportError:
        raise KeyBackendError("the PKCS#11 backend needs python-pkcs11 (pip install "
                              "'medchain[hsm]')") from None
    if not Path(settings.module).is_file():
        raise KeyBackendError(f"{settings.module}: no PKCS#11 module there")
    try:
        lib = pkcs11.lib(str(settings.module))
        token = lib.get_token(token_label=settings.token)
    except (pkcs11.PKCS11Error, RuntimeError) as exc:
        raise KeyBackendError(f"PKCS#11 token {settings.token!r} in {settings.module}: "
                              f"{type(exc).__name__}") from None
    pin = read_secret_file(settings.pin_file).decode().strip()
    return pkcs11, token, pin


def _aad(public: bytes) -> bytes:
    return canonical_bytes([_FORMAT, public])


def provision_pkcs11(settings: Pkcs11Settings) -> RecipientPublicKey:
    """Make a custodian key for a token: an AES-256 key generated inside the token (sensitive,
    not extractable, labelled ``key_label``), a fresh X25519 key encrypted by it into
    ``settings.wrapped`` (0600, never overwritten). Returns the public key for devices."""
    pkcs11, token, pin = _open_token(settings)
    from pkcs11 import Attribute, KeyType, Mechanism  # noqa: PLC0415
    from pkcs11.mechanisms import GCMParams  # noqa: PLC0415

    x25519 = X25519PrivateKey.generate()
    raw = x25519.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                               serialization.NoEncryption())
    public = RecipientKey(x25519).public
    nonce = os.urandom(_NONCE)
    try:
        with token.open(user_pin=pin, rw=True) as session:
            if list(session.get_objects({Attribute.LABEL: settings.key_label})):
                raise KeyBackendError(f"token {settings.token!r} already holds a key labelled "
                                      f"{settings.key_label!r}; refusing to replace it")
            aes = session.generate_key(KeyType.AES, 256, label=settings.key_label, store=True,
                                       template={Attribute.SENSITIVE: True,
                                                 Attribute.EXTRACTABLE: False})
            sealed = aes.encrypt(raw, mechanism=Mechanism.AES_GCM,
                                 mechanism_param=GCMParams(nonce, _aad(public.raw), 128))
    except pkcs11.PKCS11Error as exc:
        raise KeyBackendError(f"PKCS#11 token {settings.token!r}: {type(exc).__name__}") from None
    write_secret_file(settings.wrapped, canonical_bytes({
        "format": _FORMAT, "token": settings.token, "key_label": settings.key_label,
        "public": public.raw, "nonce": nonce, "sealed": bytes(sealed)}))
    return public


class Pkcs11KeyBackend(_InMemory):
    """The custodian key as the token decrypts it from ``settings.wrapped`` (after the PIN)."""

    def __init__(self, settings: Pkcs11Settings):
        where = f"{settings.wrapped}"
        try:
            record = decode(read_secret_file(settings.wrapped))
            public, nonce, sealed = record["public"], record["nonce"], record["sealed"]
            if record.get("format") != _FORMAT:
                raise KeyError("format")
            public = RecipientPublicKey(public)
        except (EncodingError, KeyError, TypeError, KeyFileError) as exc:
            if isinstance(exc, KeyFileError) and "not found" in str(exc):
                raise
            raise KeyBackendError(f"{where}: not a token-wrapped custodian key") from None
        pkcs11, token, pin = _open_token(settings)
        from pkcs11 import KeyType, Mechanism  # noqa: PLC0415
        from pkcs11.mechanisms import GCMParams  # noqa: PLC0415

        try:
            with token.open(user_pin=pin) as session:
                aes = session.get_key(label=settings.key_label, key_type=KeyType.AES)
                raw = aes.decrypt(sealed, mechanism=Mechanism.AES_GCM,
                                  mechanism_param=GCMParams(nonce, _aad(public.raw), 128))
        except pkcs11.PKCS11Error as exc:  # wrong PIN, no such key, or not wrapped by it
            raise KeyBackendError(f"{where}: token {settings.token!r} did not unwrap the custodian "
                                  f"key ({type(exc).__name__})") from None
        key = RecipientKey(X25519PrivateKey.from_private_bytes(bytes(raw)))
        if key.public != public:
            raise KeyBackendError(f"{where}: the unwrapped key is not the recorded public key")
        super().__init__(key)


def open_backend(key: Path | Pkcs11Settings) -> KeyBackend:
    """The backend a custodian configuration names: a key file path, or a token."""
    if isinstance(key, Pkcs11Settings):
        return Pkcs11KeyBackend(key)
    return FileKeyBackend(key)
