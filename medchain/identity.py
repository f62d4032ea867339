"""Identities: Ed25519 signing keys and X25519 recipient keys, and their key files.

Private keys live in PEM (PKCS#8) files created with mode 0600 and never overwritten; a file
that is missing, truncated, of the wrong key type, or readable by group or others is refused
with a :class:`KeyFileError` that names the path and the reason (never the key).

Signatures are always over ``domain || 0x00 || canonical_bytes(value)``: the domain string
(e.g. ``"medchain/v1/envelope"``) separates uses, so a signature made for one kind of message
can never be replayed as another.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from medchain.canonical import canonical_bytes
from medchain.durable import durable_write
from medchain.errors import KeyFileError, SignatureInvalid

__all__ = [
    "SigningKey",
    "VerifyKey",
    "RecipientKey",
    "RecipientPublicKey",
    "signed_message",
    "encoded_message",
    "ed25519_valid",
    "key_id",
    "write_secret_file",
    "read_secret_file",
]

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64


def ed25519_valid(public: bytes, signature: bytes, message: bytes) -> bool:
    """True iff ``signature`` is the Ed25519 signature of ``message`` under ``public`` (raw).

    The one place signatures are checked. It uses libsodium (PyNaCl) rather than
    cryptography's OpenSSL binding: every validator checks every request's signature, and on
    this project's 2-vCPU machines libsodium verifies in ~90 us against OpenSSL's ~165 us
    (keys are still made and used for signing with cryptography; the signatures are the same
    RFC 8032 bytes). libsodium also refuses non-canonical and small-order keys and ``R``
    values; every validator runs this same function, so all judge a signature alike.
    """
    if (not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE
            or not isinstance(public, bytes) or len(public) != PUBLIC_KEY_SIZE):
        return False
    try:
        crypto_sign_open(signature + message, public)
    except BadSignatureError:
        return False
    return True


def key_id(public_bytes: bytes) -> str:
    """A short, stable name for a public key: the first 16 bytes of its SHA-256, in hex."""
    return hashlib.sha256(public_bytes).digest()[:16].hex()


def signed_message(domain: str, value: Any) -> bytes:
    """The exact bytes a signature covers: domain tag, a zero byte, canonical CBOR."""
    return encoded_message(domain, canonical_bytes(value))


def encoded_message(domain: str, encoded: bytes) -> bytes:
    """Like :func:`signed_message` for a value already in canonical CBOR (encode once, sign
    and send the same bytes)."""
    if "\x00" in domain:
        raise ValueError("signature domain must not contain NUL")
    return domain.encode() + b"\x00" + encoded


def write_secret_file(path: str | os.PathLike, data: bytes) -> Path:
    """Create ``path`` with mode 0600 atomically; refuse to overwrite an existing file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return durable_write(path, data, mode=0o600, exclusive=True)
    except FileExistsError:
        raise KeyFileError(f"{path}: already exists; refusing to overwrite a key") from None


def read_secret_file(path: str | os.PathLike) -> bytes:
    """Read a file that must be private to its owner (no group or other permission bits)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file not found") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"{path}: permissions {stat.S_IMODE(st.st_mode):04o} are too open; expected 0600"
        )
    return path.read_bytes()


def _load_private(path: str | os.PathLike, kind: type, label: str):
    data = read_secret_file(path)
    if not data:
        raise KeyFileError(f"{path}: empty key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path}: truncated or not a PEM private key") from None
    if not isinstance(key, kind):
        raise KeyFileError(f"{path}: holds a {type(key).__name__}, expected an {label} key")
    return key


def _pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _raw_public(key) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """An Ed25519 public key, carried as its 32 raw bytes."""

    raw: bytes

    def __post_init__(self):
        if not isinstance(self.raw, bytes) or len(self.raw) != PUBLIC_KEY_SIZE:
            raise SignatureInvalid("Ed25519 public key must be 32 bytes")

    @property
    def id(self) -> str:
        return key_id(self.raw)

    def verify(self, domain: str, value: Any, signature: bytes) -> None:
        """Raise :class:`SignatureInvalid` unless ``signature`` is ours over ``value``."""
        self.verify_encoded(domain, canonical_bytes(value), signature)

    def verify_encoded(self, domain: str, encoded: bytes, signature: bytes) -> None:
        """:meth:`verify` for a value already in canonical CBOR."""
        if not ed25519_valid(self.raw, signature, encoded_message(domain, encoded)):
            raise SignatureInvalid(f"signature for {domain} does not verify")

    def hex(self) -> str:
        return self.raw.hex()

    @classmethod
    def from_hex(cls, text: str) -> VerifyKey:
        return cls(bytes.fromhex(text))


class SigningKey:
    """An Ed25519 private key (device, validator or model-signing key)."""

    __slots__ = ("_key", "public")

    def __init__(self, key: Ed25519PrivateKey):
        self._key = key
        self.public = VerifyKey(_raw_public(key.public_key()))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        """Deterministic key from 32 bytes, for tests and simulations only."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SigningKey:
        return cls(_load_private(path, Ed25519PrivateKey, "Ed25519"))

    def save(self, path: str | os.PathLike) -> Path:
        return write_secret_file(path, _pem(self._key))

    def sign(self, domain: str, value: Any) -> bytes:
        return self._key.sign(signed_message(domain, value))

    def sign_encoded(self, domain: str, encoded: bytes) -> bytes:
        """:meth:`sign` for a value already in canonical CBOR (the caller encoded it once)."""
        return self._key.sign(encoded_message(domain, encoded))

    def __repr__(self) -> str:  # never show key material
        return f"SigningKey(id={self.public.id})"


@dataclass(frozen=True, slots=True)
class RecipientPublicKey:
    """An X25519 public key that data keys are wrapped for (e.g. the cloud custodian)."""

    raw: bytes

    def __post_init__(self):
        if not isinstance(self.raw, bytes) or len(self.raw) != PUBLIC_KEY_SIZE:
            raise KeyFileError("X25519 public key must be 32 bytes")

    @property
    def id(self) -> str:
        return key_id(self.raw)

    def to_crypto(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.raw)

    def hex(self) -> str:
        return self.raw.hex()

    @classmethod
    def from_hex(cls, text: str) -> RecipientPublicKey:
        return cls(bytes.fromhex(text))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the public key as a PEM file (a public key: readable by anyone, never
        overwritten)."""
        pem = self.to_crypto().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return durable_write(path, pem, mode=0o644, exclusive=True)
        except FileExistsError:
            raise KeyFileError(f"{path}: already exists; refusing to overwrite a key") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> RecipientPublicKey:
        """A public key file written by :meth:`save`. A private key file is refused: who
        needs only the public half must not hold the private one."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyFileError(f"{path}: public key file not found") from None
        if b"PRIVATE KEY" in data:
            raise KeyFileError(f"{path}: holds a private key where a public key file is expected")
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyFileError(f"{path}: truncated or not a PEM public key") from None
        if not isinstance(key, X25519PublicKey):
            raise KeyFileError(f"{path}: holds a {type(key).__name__}, expected an X25519 public key")
        return cls(_raw_public(key))


class RecipientKey:
    """An X25519 private key that can unwrap data keys sealed for its public half."""

    __slots__ = ("_key", "public")

    def __init__(self, key: X25519PrivateKey):
        self._key = key
        self.public = RecipientPublicKey(_raw_public(key.public_key()))

    @classmethod
    def generate(cls) -> RecipientKey:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike) -> RecipientKey:
        return cls(_load_private(path, X25519PrivateKey, "X25519"))

    def save(self, path: str | os.PathLike) -> Path:
        return write_secret_file(path, _pem(self._key))

    def to_crypto(self) -> X25519PrivateKey:
        return self._key

    def __repr__(self) -> str:
        return f"RecipientKey(id={self.public.id})"


SECRET_SIZE = 32


def new_secret(path: str | os.PathLike) -> Path:
    """A random 256-bit secret (e.g. the site pseudonymization key), mode 0600."""
    return write_secret_file(path, os.urandom(SECRET_SIZE))


def load_secret(path: str | os.PathLike) -> bytes:
    """A secret written by :func:`new_secret` (mode 0600, exactly ``SECRET_SIZE`` bytes)."""
    data = read_secret_file(path)
    if len(data) != SECRET_SIZE:
        raise KeyFileError(f"{path}: secret must be {SECRET_SIZE} bytes, found {len(data)}")
    return data
