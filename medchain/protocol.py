"""The edge <-> cloud wire protocol, version 1 — the one module both sides import.

Every message is a frozen dataclass with ``to_wire()`` / ``from_wire()`` and is carried as
canonical CBOR (see :mod:`medchain.canonical`): byte strings travel as bytes, so ciphertext is
never base64-inflated. Each encoded message is a map ``{"v": 1, "type": <name>, ...}``; a
reader refuses another version or type with a :class:`ProtocolError` that says what is wrong.

The envelope is the unit of transfer: one de-identified object, split into named parts
(e.g. ``dicom``, ``tensor``, ``meta``), each part into AES-256-GCM chunks. Its signed header
carries the chunk table (nonce, length, SHA-256 of nonce||ciphertext per chunk), the Merkle
root over those digests, the data key wrapped for the custodian, the device id and the
per-device sequence number. Bodies (the ciphertext) ride beside the header, unsigned but
bound to it by the digests. Documented in ``docs/protocol.md``.

The model-rollout messages live in :mod:`medchain.releases` and the shared field checks in
:mod:`medchain.wire`; both are re-exported here, so this stays the one module to import.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from medchain.canonical import canonical_bytes, check_encodable, decode
from medchain.errors import EncodingError, ProtocolError
from medchain.releases import (
    ModelOffer,
    ModelRelease,
    ModelState,
    ModelStatus,
    OfferStage,
    model_offer_topic,
    model_status_subscription,
    model_status_topic,
    release_topic,
)
from medchain.wire import DIGEST_SIZE, MAX_CHUNKS, TOPIC_PREFIX, VERSION, Signed
from medchain.wire import as_map as _map
from medchain.wire import bounded_list as _list
from medchain.wire import fixed_bytes as _fixed_bytes
from medchain.wire import get_field as _get
from medchain.wire import nonneg as _nonneg

__all__ = [
    "VERSION",
    "TOPIC_PREFIX",
    "envelope_topic",
    "envelope_subscription",
    "ack_topic",
    "heartbeat_topic",
    "heartbeat_subscription",
    "device_from_topic",
    "model_offer_topic",
    "model_status_topic",
    "model_status_subscription",
    "release_topic",
    "Part",
    "ChunkRef",
    "EnvelopeHeader",
    "Envelope",
    "Fragment",
    "fragment",
    "Ack",
    "AckStatus",
    "Heartbeat",
    "ModelRelease",
    "ModelOffer",
    "ModelStatus",
    "ModelState",
    "OfferStage",
    "Enrollment",
    "encode",
    "decode_message",
    "ENVELOPE_SIGNING_DOMAIN",
]

ENVELOPE_SIGNING_DOMAIN = f"medchain/v{VERSION}/envelope"

NONCE_SIZE = 12
OBJECT_ID_SIZE = 16


def envelope_topic(device_id: str) -> str:
    """Edge publishes envelopes here (QoS 1)."""
    return f"{TOPIC_PREFIX}/devices/{device_id}/envelopes"


def envelope_subscription(shared_group: str | None = None) -> str:
    """What ingest subscribes to; a shared subscription spreads devices over workers."""
    topic = f"{TOPIC_PREFIX}/devices/+/envelopes"
    return f"$share/{shared_group}/{topic}" if shared_group else topic


def ack_topic(device_id: str) -> str:
    """Cloud answers each envelope here: stored, duplicate or rejected with a reason."""
    return f"{TOPIC_PREFIX}/devices/{device_id}/acks"


def heartbeat_topic(device_id: str) -> str:
    """Retained: the latest health of each device (queue depth, disk, model version)."""
    return f"{TOPIC_PREFIX}/devices/{device_id}/heartbeat"


def heartbeat_subscription() -> str:
    return f"{TOPIC_PREFIX}/devices/+/heartbeat"


def device_from_topic(topic: str) -> str:
    """The device id of a ``medchain/v1/devices/{id}/...`` topic."""
    prefix = f"{TOPIC_PREFIX}/devices/"
    rest = topic[len(prefix):] if topic.startswith(prefix) else ""
    device = rest.split("/", 1)[0]
    if not device:
        raise ProtocolError(f"topic {topic!r} is not a device topic")
    return device


# -- envelope -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Part:
    """A named part of the object: chunks ``first .. first+count-1`` hold its ciphertext."""

    name: str
    media_type: str
    length: int
    first: int
    count: int

    def to_wire(self) -> dict:
        return {
            "name": self.name,
            "media_type": self.media_type,
            "length": self.length,
            "first": self.first,
            "count": self.count,
        }

    @classmethod
    def from_wire(cls, msg: Any, where: str) -> Part:
        msg = _map(msg, where)
        return cls(
            name=_get(msg, "name", str, where),
            media_type=_get(msg, "media_type", str, where),
            length=_nonneg(msg, "length", where),
            first=_nonneg(msg, "first", where),
            count=_nonneg(msg, "count", where),
        )


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One row of the chunk table: its nonce, ciphertext length and SHA-256(nonce||ct)."""

    nonce: bytes
    length: int
    digest: bytes

    def to_wire(self) -> dict:
        return {"nonce": self.nonce, "length": self.length, "digest": self.digest}

    @classmethod
    def from_wire(cls, msg: Any, where: str) -> ChunkRef:
        msg = _map(msg, where)
        return cls(
            nonce=_fixed_bytes(msg, "nonce", NONCE_SIZE, where),
            length=_nonneg(msg, "length", where),
            digest=_fixed_bytes(msg, "digest", DIGEST_SIZE, where),
        )


@dataclass(frozen=True, slots=True)
class EnvelopeHeader:
    """Everything the device signs. ``meta`` is small, de-identified and canonical-encodable
    (pseudonymous ids, modality, consent flags): what the cloud may read without the key."""

    object_id: bytes
    device_id: str
    sequence: int
    created_ms: int
    parts: tuple[Part, ...]
    chunks: tuple[ChunkRef, ...]
    merkle_root: bytes
    recipient: str
    wrapped_key: bytes
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def envelope_id(self) -> str:
        return self.object_id.hex()

    def to_wire(self) -> dict:
        return {
            "object_id": self.object_id,
            "device_id": self.device_id,
            "sequence": self.sequence,
            "created_ms": self.created_ms,
            "parts": [p.to_wire() for p in self.parts],
            "chunks": [c.to_wire() for c in self.chunks],
            "merkle_root": self.merkle_root,
            "recipient": self.recipient,
            "wrapped_key": self.wrapped_key,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_wire(cls, msg: Any) -> EnvelopeHeader:
        where = "envelope header"
        msg = _map(msg, where)
        header = cls(
            object_id=_fixed_bytes(msg, "object_id", OBJECT_ID_SIZE, where),
            device_id=_get(msg, "device_id", str, where),
            sequence=_nonneg(msg, "sequence", where),
            created_ms=_nonneg(msg, "created_ms", where),
            parts=tuple(
                Part.from_wire(p, f"{where}: parts[{i}]")
                for i, p in enumerate(_list(msg, "parts", where, limit=64))
            ),
            chunks=tuple(
                ChunkRef.from_wire(c, f"{where}: chunks[{i}]")
                for i, c in enumerate(_list(msg, "chunks", where))
            ),
            merkle_root=_fixed_bytes(msg, "merkle_root", DIGEST_SIZE, where),
            recipient=_get(msg, "recipient", str, where),
            wrapped_key=_get(msg, "wrapped_key", bytes, where),
            meta=dict(_map(msg.get("meta", {}), f"{where}: meta")),
        )
        try:
            check_encodable(header.meta, "meta")
        except EncodingError as exc:
            raise ProtocolError(f"{where}: {exc}") from None
        header.check_layout()
        return header

    def check_layout(self) -> None:
        """The part table must tile the chunk table exactly, in order, with no gap."""
        if not self.parts:
            raise ProtocolError("envelope header: no parts")
        names = [p.name for p in self.parts]
        if len(set(names)) != len(names):
            raise ProtocolError("envelope header: duplicate part names")
        expected = 0
        for part in self.parts:
            if part.first != expected or part.count < 1:
                raise ProtocolError(
                    f"envelope header: part '{part.name}' does not start at chunk {expected} "
                    "or has no chunk"
                )
            expected += part.count
        if expected != len(self.chunks):
            raise ProtocolError(
                f"envelope header: parts cover {expected} chunks, table has {len(self.chunks)}"
            )


@dataclass(frozen=True, slots=True)
class Envelope:
    """A sealed object: signed header, its signature and the ciphertext bodies."""

    header: EnvelopeHeader
    signature: bytes
    bodies: tuple[bytes, ...]

    TYPE: ClassVar[str] = "envelope"

    @property
    def envelope_id(self) -> str:
        return self.header.envelope_id

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.bodies)

    def part(self, name: str) -> Part:
        for p in self.header.parts:
            if p.name == name:
                return p
        raise KeyError(f"envelope {self.envelope_id} has no part '{name}'")

    def to_wire(self) -> dict:
        return {
            "header": self.header.to_wire(),
            "signature": self.signature,
            "bodies": list(self.bodies),
        }

    @classmethod
    def from_wire(cls, msg: Mapping) -> Envelope:
        header = EnvelopeHeader.from_wire(msg.get("header"))
        bodies = _list(msg, "bodies", "envelope")
        if len(bodies) != len(header.chunks):
            raise ProtocolError(
                f"envelope: {len(bodies)} bodies for {len(header.chunks)} chunk table rows"
            )
        for i, (body, ref) in enumerate(zip(bodies, header.chunks)):
            if not isinstance(body, bytes):
                raise ProtocolError(f"envelope: bodies[{i}] must be bytes")
            if len(body) != ref.length:
                raise ProtocolError(
                    f"envelope: bodies[{i}] is {len(body)} bytes, chunk table says {ref.length}"
                )
        return cls(header, _get(msg, "signature", bytes, "envelope"), tuple(bodies))


# -- fragments: envelopes larger than the broker's message limit -----------------------------


@dataclass(frozen=True, slots=True)
class Fragment:
    """One slice of an encoded message too large for one MQTT publish.

    ``digest`` is SHA-256 of the whole encoded message, so slices of two different messages
    that share an id can never be stitched together; the envelope inside stays signed.
    """

    message_id: bytes
    index: int
    count: int
    total: int
    digest: bytes
    data: bytes

    TYPE: ClassVar[str] = "fragment"

    def to_wire(self) -> dict:
        return {
            "message_id": self.message_id,
            "index": self.index,
            "count": self.count,
            "total": self.total,
            "digest": self.digest,
            "data": self.data,
        }

    @classmethod
    def from_wire(cls, msg: Mapping) -> Fragment:
        where = "fragment"
        frag = cls(
            message_id=_fixed_bytes(msg, "message_id", OBJECT_ID_SIZE, where),
            index=_nonneg(msg, "index", where),
            count=_nonneg(msg, "count", where),
            total=_nonneg(msg, "total", where),
            digest=_fixed_bytes(msg, "digest", DIGEST_SIZE, where),
            data=_get(msg, "data", bytes, where),
        )
        if not 0 <= frag.index < frag.count <= MAX_CHUNKS:
            raise ProtocolError(f"fragment: index {frag.index} outside count {frag.count}")
        if len(frag.data) > frag.total:
            raise ProtocolError("fragment: slice larger than the whole message")
        return frag


FRAGMENT_OVERHEAD = 160  # generous upper bound of a fragment's CBOR framing


def fragment(message_id: bytes, data: bytes, max_message_bytes: int) -> list[bytes]:
    """Encoded fragments of ``data``, each at most ``max_message_bytes`` once encoded."""
    room = max_message_bytes - FRAGMENT_OVERHEAD
    if room <= 0:
        raise ValueError(f"max_message_bytes {max_message_bytes} leaves no room for data")
    digest = hashlib.sha256(data).digest()
    count = max(1, -(-len(data) // room))
    return [
        encode(Fragment(message_id, i, count, len(data), digest, data[i * room : (i + 1) * room]))
        for i in range(count)
    ]


# -- signed control messages ----------------------------------------------------------------


class AckStatus:
    STORED = "stored"  # verified, stored once, registered on the ledger: release it
    DUPLICATE = "duplicate"  # seen before and already stored: release it
    REJECTED = "rejected"  # refused for ``reason``; resending will not help
    ALL = (STORED, DUPLICATE, REJECTED)


@dataclass(frozen=True, slots=True)
class Ack(Signed):
    """The cloud's answer to one envelope, signed by the ingest service key, so nobody else
    on the broker can make a device drop data it still holds."""

    envelope_id: str
    device_id: str
    sequence: int
    status: str
    reason: str = ""
    ledger_height: int = -1
    tx_index: int = -1
    sent_ms: int = 0
    signature: bytes = b""

    TYPE: ClassVar[str] = "ack"
    DOMAIN: ClassVar[str] = f"medchain/v{VERSION}/ack"

    @property
    def releases(self) -> bool:
        return self.status in (AckStatus.STORED, AckStatus.DUPLICATE)

    def body(self) -> dict:
        return {
            "envelope_id": self.envelope_id,
            "device_id": self.device_id,
            "sequence": self.sequence,
            "status": self.status,
            "reason": self.reason,
            "ledger_height": self.ledger_height,
            "tx_index": self.tx_index,
            "sent_ms": self.sent_ms,
        }

    @classmethod
    def from_wire(cls, msg: Mapping) -> Ack:
        where = "ack"
        ack = cls(
            envelope_id=_get(msg, "envelope_id", str, where),
            device_id=_get(msg, "device_id", str, where),
            sequence=_nonneg(msg, "sequence", where),
            status=_get(msg, "status", str, where),
            reason=_get(msg, "reason", str, where),
            ledger_height=_get(msg, "ledger_height", int, where),
            tx_index=_get(msg, "tx_index", int, where),
            sent_ms=_nonneg(msg, "sent_ms", where),
            signature=_get(msg, "signature", bytes, where),
        )
        if ack.status not in AckStatus.ALL:
            raise ProtocolError(f"ack: unknown status {ack.status!r}")
        return ack


@dataclass(frozen=True, slots=True)
class Heartbeat(Signed):
    """A device's health, published retained and signed by the device key."""

    device_id: str
    sent_ms: int
    queue_depth: int
    queue_bytes: int
    disk_free_bytes: int
    model_version: str = ""
    state: str = "ok"
    signature: bytes = b""

    TYPE: ClassVar[str] = "heartbeat"
    DOMAIN: ClassVar[str] = f"medchain/v{VERSION}/heartbeat"

    def body(self) -> dict:
        return {
            "device_id": self.device_id,
            "sent_ms": self.sent_ms,
            "queue_depth": self.queue_depth,
            "queue_bytes": self.queue_bytes,
            "disk_free_bytes": self.disk_free_bytes,
            "model_version": self.model_version,
            "state": self.state,
        }

    @classmethod
    def from_wire(cls, msg: Mapping) -> Heartbeat:
        where = "heartbeat"
        return cls(
            device_id=_get(msg, "device_id", str, where),
            sent_ms=_nonneg(msg, "sent_ms", where),
            queue_depth=_nonneg(msg, "queue_depth", where),
            queue_bytes=_nonneg(msg, "queue_bytes", where),
            disk_free_bytes=_nonneg(msg, "disk_free_bytes", where),
            model_version=_get(msg, "model_version", str, where),
            state=_get(msg, "state", str, where),
            signature=_get(msg, "signature", bytes, where),
        )


# -- enrolment -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What the cloud hands a device at enrolment (a file the operator copies to the edge):
    the keys the device must trust. Public keys only: nothing here is secret."""

    device_id: str
    device_key: bytes  # the device's own Ed25519 public key, as enrolled
    ingest_key: bytes  # Ed25519: signs acks (and nothing else may release the outbox)
    custodian_key: bytes  # X25519: data keys are wrapped for it
    model_key: bytes  # Ed25519: the training service's model-signing key
    issued_ms: int
    # the ledger validators' Ed25519 keys (genesis order): a device checks a model's
    # MODEL_RELEASED receipt against them without talking to the ledger
    validators: tuple[bytes, ...] = ()

    def to_json(self) -> str:
        import json

        return json.dumps({
            "version": VERSION, "device_id": self.device_id, "device_key": self.device_key.hex(),
            "ingest_key": self.ingest_key.hex(), "custodian_key": self.custodian_key.hex(),
            "model_key": self.model_key.hex(), "issued_ms": self.issued_ms,
            "validators": [v.hex() for v in self.validators],
        }, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "enrollment") -> Enrollment:
        import json

        try:
            msg = json.loads(text)
        except ValueError as exc:
            raise ProtocolError(f"{where}: not JSON ({exc})") from None
        msg = _map(msg, where)
        if msg.get("version") != VERSION:
            raise ProtocolError(f"{where}: unsupported version {msg.get('version')!r}")

        def key(name: str, text: Any = None) -> bytes:
            text = _get(msg, name, str, where) if text is None else text
            try:
                raw = bytes.fromhex(text) if isinstance(text, str) else b""
            except ValueError:
                raise ProtocolError(f"{where}: {name} is not hex") from None
            if len(raw) != 32:
                raise ProtocolError(f"{where}: {name} must be 32 bytes of hex")
            return raw

        validators = tuple(key("validators", v) for v in msg.get("validators", []))
        return cls(_get(msg, "device_id", str, where), key("device_key"), key("ingest_key"),
                   key("custodian_key"), key("model_key"), _nonneg(msg, "issued_ms", where),
                   validators)


# -- encoding -------------------------------------------------------------------------------

MESSAGE_TYPES: dict[str, type] = {m.TYPE: m for m in (Envelope, Fragment, Ack, Heartbeat,
                                                       ModelRelease, ModelOffer, ModelStatus)}


def encode(message: Any) -> bytes:
    """Encode a protocol message as canonical CBOR with its version and type."""
    body = message.to_wire()
    body["v"] = VERSION
    body["type"] = message.TYPE
    return canonical_bytes(body)


def decode_message(data: bytes, expect: type | None = None) -> Any:
    """Parse bytes into a protocol message; :class:`ProtocolError` says what is wrong."""
    try:
        msg = decode(data)
    except EncodingError as exc:
        raise ProtocolError(f"not a protocol message: {exc}") from None
    msg = _map(msg, "message")
    version = msg.get("v")
    if version != VERSION:
        raise ProtocolError(f"message: unsupported protocol version {version!r}, expected {VERSION}")
    kind = MESSAGE_TYPES.get(msg.get("type"))
    if kind is None:
        raise ProtocolError(f"message: unknown type {msg.get('type')!r}")
    if expect is not None and kind is not expect:
        raise ProtocolError(f"message: expected {expect.TYPE}, got {kind.TYPE}")
    return kind.from_wire(msg)
