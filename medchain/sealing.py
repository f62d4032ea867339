"""Sealing: bytes in, signed envelope out; and back. The only public crypto surface.

Recipe (all primitives from ``cryptography``; nothing here is a primitive of our own):

* a fresh 256-bit AES-GCM data key per object;
* each chunk encrypted under a fresh random 96-bit nonce, with associated data
  ``canonical(["medchain/v1/chunk", object_id, index, count])`` — a chunk moved to another
  position, another object, or into an object with more or fewer chunks fails to decrypt;
* the chunk digest is SHA-256(nonce || ciphertext), and the Merkle tree (RFC 6962) is over
  those digests, so the cloud can check integrity without the key;
* the data key is wrapped for the recipient's X25519 key with HPKE (RFC 9180 base mode,
  DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM), ``info`` binding the object id;
* the de-identified metadata (canonical CBOR) is HPKE-sealed the same way for the ingest
  service's metadata key, ``info`` binding object and device id: ingest reads it to register
  the image; the broker never sees it;
* the device signs the header (chunk table, root, wrapped key, sealed metadata, ids) with
  Ed25519.

Cores are pure: randomness comes in through ``rng`` and time through ``created_ms``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medchain.canonical import canonical_bytes, decode, is_plain
from medchain.identity import RecipientKey, RecipientPublicKey, SigningKey, VerifyKey
from medchain.merkle import merkle_root
from medchain.errors import DecryptionError, EncodingError, VerificationError
from medchain.protocol import (
    ENVELOPE_SIGNING_DOMAIN,
    NONCE_SIZE,
    OBJECT_ID_SIZE,
    ChunkRef,
    Envelope,
    EnvelopeHeader,
    Part,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ObjectKey",
    "new_object_key",
    "package",
    "seal",
    "verify",
    "open_envelope",
    "wrap_key",
    "unwrap_key",
    "seal_meta",
    "open_meta",
    "chunk_aad",
    "encrypt_chunk",
    "decrypt_chunk",
    "chunk_digest",
    "KeyUnwrapper",
    "wrap_key_for_principal",
    "unwrap_key_for_principal",
    "open_with_data_key",
]

DEFAULT_CHUNK_SIZE = 256 * 1024
KEY_SIZE = 32
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)

Rng = Callable[[int], bytes]


def chunk_aad(object_id: bytes, index: int, count: int) -> bytes:
    return canonical_bytes(["medchain/v1/chunk", object_id, index, count])


def _key_info(object_id: bytes) -> bytes:
    return canonical_bytes(["medchain/v1/data-key", object_id])


def chunk_digest(nonce: bytes, body: bytes) -> bytes:
    h = hashlib.sha256(nonce)
    h.update(body)
    return h.digest()


def encrypt_chunk(aead: AESGCM, object_id: bytes, index: int, count: int, nonce: bytes, data) -> bytes:
    return aead.encrypt(nonce, data, chunk_aad(object_id, index, count))


def decrypt_chunk(aead: AESGCM, object_id: bytes, index: int, count: int, nonce: bytes, body: bytes) -> bytes:
    try:
        return aead.decrypt(nonce, body, chunk_aad(object_id, index, count))
    except InvalidTag:
        raise DecryptionError(f"chunk {index} of object {object_id.hex()} failed to decrypt") from None


def wrap_key(data_key: bytes, object_id: bytes, recipient: RecipientPublicKey) -> bytes:
    """HPKE-seal ``data_key`` for ``recipient``; output is ``enc || ciphertext``."""
    return _SUITE.encrypt(data_key, recipient.to_crypto(), info=_key_info(object_id))


def unwrap_key(wrapped: bytes, object_id: bytes, recipient: RecipientKey) -> bytes:
    try:
        key = _SUITE.decrypt(wrapped, recipient.to_crypto(), info=_key_info(object_id))
    except (InvalidTag, ValueError):
        raise DecryptionError(f"data key of object {object_id.hex()} failed to unwrap") from None
    if len(key) != KEY_SIZE:
        raise DecryptionError(f"data key of object {object_id.hex()} has the wrong size")
    return key


def _grant_info(object_id: bytes, principal: str) -> bytes:
    return canonical_bytes(["medchain/v1/granted-data-key", object_id, principal])


def wrap_key_for_principal(data_key: bytes, object_id: bytes, principal: str,
                           recipient: RecipientPublicKey) -> bytes:
    """HPKE-seal an object's data key for one ledger principal (the custodian's re-wrap of
    a granted image). ``info`` binds the object id and the principal's name, so the wrapped
    key opens neither another object nor under another principal's name."""
    return _SUITE.encrypt(data_key, recipient.to_crypto(), info=_grant_info(object_id, principal))


def unwrap_key_for_principal(wrapped: bytes, object_id: bytes, principal: str,
                             recipient: RecipientKey) -> bytes:
    try:
        key = _SUITE.decrypt(wrapped, recipient.to_crypto(), info=_grant_info(object_id, principal))
    except (InvalidTag, ValueError):
        raise DecryptionError(f"granted data key of object {object_id.hex()} failed to unwrap") from None
    if len(key) != KEY_SIZE:
        raise DecryptionError(f"granted data key of object {object_id.hex()} has the wrong size")
    return key


class KeyUnwrapper(Protocol):
    """What holds a recipient key without handing it out (a custodian's key backend): it
    unwraps a data key sealed by :func:`wrap_key`, raising :class:`DecryptionError`."""

    public: RecipientPublicKey

    def unwrap(self, wrapped: bytes, object_id: bytes) -> bytes: ...


def _meta_info(object_id: bytes, device_id: str) -> bytes:
    return canonical_bytes(["medchain/v1/envelope-meta", object_id, device_id])


def seal_meta(meta: Mapping[str, Any], object_id: bytes, device_id: str,
              recipient: RecipientPublicKey) -> bytes:
    """HPKE-seal ``meta`` (canonical CBOR) for ``recipient``; ``enc || ciphertext``."""
    return _SUITE.encrypt(canonical_bytes(dict(meta)), recipient.to_crypto(),
                          info=_meta_info(object_id, device_id))


def open_meta(header: EnvelopeHeader, recipient: RecipientKey) -> dict[str, Any]:
    """The metadata sealed in ``header`` (``{}`` when there is none). Raises
    :class:`DecryptionError` when it is not sealed for ``recipient`` under this object and
    device, or does not decode to a text-keyed map of plain values."""
    if not header.sealed_meta:
        return {}
    where = f"metadata of envelope {header.envelope_id}"
    try:
        plain = _SUITE.decrypt(header.sealed_meta, recipient.to_crypto(),
                               info=_meta_info(header.object_id, header.device_id))
    except (InvalidTag, ValueError):
        raise DecryptionError(f"{where} failed to open") from None
    try:
        meta = decode(plain)
    except EncodingError as exc:
        raise DecryptionError(f"{where}: {exc}") from None
    if type(meta) is not dict or not is_plain(meta):
        raise DecryptionError(f"{where} is not a map of plain values")
    return meta


def _chunk_count(length: int, chunk_size: int) -> int:
    return max(1, -(-length // chunk_size))


@dataclass(frozen=True, slots=True)
class ObjectKey:
    """A fresh object id and data key, the key already wrapped for the recipient.

    Wrapping does not depend on the data, so a shell may prepare these ahead of time (the
    HPKE key agreement is the dearest fixed cost of sealing a small object). Use each once.
    """

    object_id: bytes
    data_key: bytes
    wrapped_key: bytes
    recipient: str

    def __repr__(self) -> str:  # never show the data key
        return f"ObjectKey(object_id={self.object_id.hex()}, recipient={self.recipient})"


def new_object_key(recipient: RecipientPublicKey, rng: Rng = os.urandom) -> ObjectKey:
    object_id = rng(OBJECT_ID_SIZE)
    data_key = rng(KEY_SIZE)
    return ObjectKey(object_id, data_key, wrap_key(data_key, object_id, recipient), recipient.id)


def package(
    parts: Mapping[str, bytes],
    key: ObjectKey,
    *,
    device_id: str,
    sequence: int,
    signer: SigningKey,
    created_ms: int,
    meta: Mapping[str, Any] | None = None,
    meta_recipient: RecipientPublicKey | None = None,
    media_types: Mapping[str, str] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    rng: Rng = os.urandom,
) -> Envelope:
    """Chunk, encrypt, hash, Merkle-root and sign ``parts`` under a prepared key; ``meta``,
    when given, is sealed for ``meta_recipient`` (:func:`seal_meta`)."""
    if not parts:
        raise ValueError("package: nothing to seal (no parts)")
    if meta and meta_recipient is None:
        raise ValueError("package: metadata needs a recipient to be sealed for")
    if chunk_size < 1:
        raise ValueError("package: chunk_size must be positive")
    media_types = media_types or {}
    object_id = key.object_id
    aead = AESGCM(key.data_key)
    count = sum(_chunk_count(len(data), chunk_size) for data in parts.values())

    table: list[Part] = []
    refs: list[ChunkRef] = []
    bodies: list[bytes] = []
    for name, data in parts.items():
        view = memoryview(data)
        first = len(bodies)
        n = _chunk_count(len(view), chunk_size)
        for k in range(n):
            nonce = rng(NONCE_SIZE)
            piece = view[k * chunk_size : (k + 1) * chunk_size]
            body = encrypt_chunk(aead, object_id, len(bodies), count, nonce, piece)
            refs.append(ChunkRef(nonce, len(body), chunk_digest(nonce, body)))
            bodies.append(body)
        table.append(
            Part(name, media_types.get(name, "application/octet-stream"), len(view), first, n)
        )

    header = EnvelopeHeader(
        object_id=object_id,
        device_id=device_id,
        sequence=sequence,
        created_ms=created_ms,
        parts=tuple(table),
        chunks=tuple(refs),
        merkle_root=merkle_root([r.digest for r in refs]),
        recipient=key.recipient,
        wrapped_key=key.wrapped_key,
        sealed_meta=seal_meta(meta, object_id, device_id, meta_recipient) if meta else b"",
    )
    signature = signer.sign(ENVELOPE_SIGNING_DOMAIN, header.to_wire())
    return Envelope(header, signature, tuple(bodies))


def seal(
    parts: Mapping[str, bytes],
    *,
    recipient: RecipientPublicKey,
    rng: Rng = os.urandom,
    **kwargs: Any,
) -> Envelope:
    """Seal ``parts`` for ``recipient``: :func:`new_object_key` then :func:`package`.

    Keyword arguments are those of :func:`package` (device_id, sequence, signer, created_ms,
    meta, meta_recipient, media_types, chunk_size).
    """
    return package(parts, new_object_key(recipient, rng), rng=rng, **kwargs)


def verify(envelope: Envelope, device_key: VerifyKey) -> None:
    """Check signature, every chunk digest and the Merkle root; no key needed.

    Raises :class:`VerificationError` naming the envelope and the failed check.
    """
    header = envelope.header
    eid = header.envelope_id
    header.check_layout()
    try:
        device_key.verify(ENVELOPE_SIGNING_DOMAIN, header.to_wire(), envelope.signature)
    except VerificationError:
        raise VerificationError(f"envelope {eid}: device signature does not verify") from None
    if len(envelope.bodies) != len(header.chunks):
        raise VerificationError(f"envelope {eid}: chunk count does not match the chunk table")
    for i, (ref, body) in enumerate(zip(header.chunks, envelope.bodies)):
        if len(body) != ref.length or not hmac.compare_digest(chunk_digest(ref.nonce, body), ref.digest):
            raise VerificationError(f"envelope {eid}: chunk {i} does not match its digest")
    if merkle_root([r.digest for r in header.chunks]) != header.merkle_root:
        raise VerificationError(f"envelope {eid}: Merkle root does not match the chunk digests")


def open_envelope(
    envelope: Envelope,
    recipient: RecipientKey | KeyUnwrapper,
    device_key: VerifyKey,
    names: Iterable[str] | None = None,
) -> dict[str, bytes]:
    """Verify, unwrap the data key (with the key itself, or through a
    :class:`KeyUnwrapper`) and decrypt the named parts (all by default)."""
    verify(envelope, device_key)
    header = envelope.header
    if header.recipient != recipient.public.id:
        raise DecryptionError(f"envelope {header.envelope_id} is sealed for another recipient")
    if isinstance(recipient, RecipientKey):
        data_key = unwrap_key(header.wrapped_key, header.object_id, recipient)
    else:
        data_key = recipient.unwrap(header.wrapped_key, header.object_id)
    return _decrypt_parts(envelope, data_key, names)


def open_with_data_key(envelope: Envelope, data_key: bytes, device_key: VerifyKey,
                       names: Iterable[str] | None = None) -> dict[str, bytes]:
    """Verify and decrypt with a data key already unwrapped (a requester's, from the key
    the custodian re-wrapped for it)."""
    verify(envelope, device_key)
    return _decrypt_parts(envelope, data_key, names)


def _decrypt_parts(envelope: Envelope, data_key: bytes,
                   names: Iterable[str] | None) -> dict[str, bytes]:
    header = envelope.header
    aead = AESGCM(data_key)
    count = len(header.chunks)
    wanted = set(names) if names is not None else {p.name for p in header.parts}
    missing = wanted - {p.name for p in header.parts}
    if missing:
        raise KeyError(f"envelope {header.envelope_id} has no part(s) {sorted(missing)}")
    out: dict[str, bytes] = {}
    for part in header.parts:
        if part.name not in wanted:
            continue
        pieces = [
            decrypt_chunk(aead, header.object_id, i, count, header.chunks[i].nonce, envelope.bodies[i])
            for i in range(part.first, part.first + part.count)
        ]
        data = b"".join(pieces)
        if len(data) != part.length:
            raise VerificationError(
                f"envelope {header.envelope_id}: part '{part.name}' is {len(data)} bytes, "
                f"header says {part.length}"
            )
        out[part.name] = data
    return out
