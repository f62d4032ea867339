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

Each message declares its fields once (wire key, codec, default) with
:func:`medchain.fields.wire`; ``to_wire``, ``from_wire`` and the checks follow from that.
The model-rollout messages live in :mod:`medchain.releases` and the protocol's codecs and
message bases in :mod:`medchain.wire`; the messages are re-exported here, so this stays the
one module to import.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from medchain.canonical import canonical_bytes, decode
from medchain.errors import EncodingError, ProtocolError
from medchain.fields import BYTES, TEXT, Bytes, Choice, Hex, Invalid, ListOf, Record, wire
from medchain.releases import (
    SERVED_PRECISIONS,
    VARIANT_PRECISIONS,
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
from medchain.wire import (
    DIGEST,
    INT,
    MAX_CHUNKS,
    NONNEG,
    TOPIC_PREFIX,
    VERSION,
    Signed,
    Wire,
    message,
    record,
)

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
    "VARIANT_PRECISIONS",
    "SERVED_PRECISIONS",
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


@record("part")
@dataclass(frozen=True, slots=True)
class Part(Wire):
    """A named part of the object: chunks ``first .. first+count-1`` hold its ciphertext."""

    name: str = wire("name", TEXT)
    media_type: str = wire("media_type", TEXT)
    length: int = wire("length", NONNEG)
    first: int = wire("first", NONNEG)
    count: int = wire("count", NONNEG)


@record("chunk")
@dataclass(frozen=True, slots=True)
class ChunkRef(Wire):
    """One row of the chunk table: its nonce, ciphertext length and SHA-256(nonce||ct)."""

    nonce: bytes = wire("nonce", Bytes(NONCE_SIZE))
    length: int = wire("length", NONNEG)
    digest: bytes = wire("digest", DIGEST)


def _layout(header: EnvelopeHeader) -> None:
    header.check_layout()


@record("envelope header", check=_layout)
@dataclass(frozen=True, slots=True)
class EnvelopeHeader(Wire):
    """Everything the device signs. Nothing clinical is in clear text: ``sealed_meta`` holds
    the de-identified metadata (pseudonymous ids, modality, consent, prediction) HPKE-sealed
    for the ingest service's metadata key (:func:`medchain.sealing.open_meta`), so the broker
    and anyone on it see only routing: ids, sizes, digests."""

    object_id: bytes = wire("object_id", Bytes(OBJECT_ID_SIZE))
    device_id: str = wire("device_id", TEXT)
    sequence: int = wire("sequence", NONNEG)
    created_ms: int = wire("created_ms", NONNEG)
    parts: tuple[Part, ...] = wire("parts", ListOf(Record(Part), limit=64))
    chunks: tuple[ChunkRef, ...] = wire("chunks", ListOf(Record(ChunkRef), limit=MAX_CHUNKS))
    merkle_root: bytes = wire("merkle_root", DIGEST)
    recipient: str = wire("recipient", TEXT)
    wrapped_key: bytes = wire("wrapped_key", BYTES)
    sealed_meta: bytes = wire("sealed_meta", BYTES, default=b"")

    @property
    def envelope_id(self) -> str:
        return self.object_id.hex()

    def digest(self) -> bytes:
        """SHA-256 of the header as signed: what an ack names, so it answers this header
        and no other under the same id."""
        return hashlib.sha256(canonical_bytes(self.to_wire())).digest()

    def check_layout(self) -> None:
        """The part table must tile the chunk table exactly, in order, with no gap."""
        if not self.parts:
            raise ProtocolError("envelope header: no parts")
        if len({p.name for p in self.parts}) != len(self.parts):
            raise ProtocolError("envelope header: duplicate part names")
        expected = 0
        for i, part in enumerate(self.parts):
            if part.first != expected or part.count < 1:
                raise ProtocolError(f"envelope header: parts[{i}] does not start where the "
                                    "part before it ends, or has no chunk")
            expected += part.count
        if expected != len(self.chunks):
            raise ProtocolError("envelope header: parts do not cover the chunk table")


def _bodies_match_chunks(envelope: Envelope) -> None:
    chunks = envelope.header.chunks
    if len(envelope.bodies) != len(chunks):
        raise Invalid("must hold one body per chunk table row", "bodies")
    for i, (body, ref) in enumerate(zip(envelope.bodies, chunks)):
        if len(body) != ref.length:
            raise Invalid("is not the length its chunk table row says", f"bodies[{i}]")


@message("envelope", check=_bodies_match_chunks)
@dataclass(frozen=True, slots=True)
class Envelope(Wire):
    """A sealed object: signed header, its signature and the ciphertext bodies."""

    header: EnvelopeHeader = wire("header", Record(EnvelopeHeader))
    signature: bytes = wire("signature", BYTES)
    bodies: tuple[bytes, ...] = wire("bodies", ListOf(BYTES, limit=MAX_CHUNKS))

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


# -- fragments: envelopes larger than the broker's message limit -----------------------------


def _fragment_fits(frag: Fragment) -> None:
    if not frag.index < frag.count <= MAX_CHUNKS:
        raise Invalid(f"must be below 'count', itself at most {MAX_CHUNKS}", "index")
    if len(frag.data) > frag.total:
        raise Invalid("is larger than the whole message", "data")


@message("fragment", check=_fragment_fits)
@dataclass(frozen=True, slots=True)
class Fragment(Wire):
    """One slice of an encoded message too large for one MQTT publish.

    ``digest`` is SHA-256 of the whole encoded message, so slices of two different messages
    that share an id can never be stitched together; the envelope inside stays signed.
    """

    message_id: bytes = wire("message_id", Bytes(OBJECT_ID_SIZE))
    index: int = wire("index", NONNEG)
    count: int = wire("count", NONNEG)
    total: int = wire("total", NONNEG)
    digest: bytes = wire("digest", DIGEST)
    data: bytes = wire("data", BYTES)

    TYPE: ClassVar[str] = "fragment"


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


@message("ack")
@dataclass(frozen=True, slots=True)
class Ack(Signed):
    """The cloud's answer to one envelope, signed by the ingest service key, so nobody else
    on the broker can make a device drop data it still holds; ``header_hash`` binds it to the
    header the device signed (:meth:`EnvelopeHeader.digest`): a device acts only on an ack
    for an envelope it holds with exactly that header."""

    envelope_id: str = wire("envelope_id", TEXT)
    header_hash: bytes = wire("header_hash", DIGEST)
    device_id: str = wire("device_id", TEXT)
    sequence: int = wire("sequence", NONNEG)
    status: str = wire("status", Choice(*AckStatus.ALL))
    reason: str = wire("reason", TEXT, default="")
    ledger_height: int = wire("ledger_height", INT, default=-1)
    tx_index: int = wire("tx_index", INT, default=-1)
    sent_ms: int = wire("sent_ms", NONNEG, default=0)
    signature: bytes = wire("signature", BYTES, default=b"", signed=False)

    TYPE: ClassVar[str] = "ack"
    DOMAIN: ClassVar[str] = f"medchain/v{VERSION}/ack"

    @property
    def releases(self) -> bool:
        return self.status in (AckStatus.STORED, AckStatus.DUPLICATE)


@message("heartbeat")
@dataclass(frozen=True, slots=True)
class Heartbeat(Signed):
    """A device's health, published retained and signed by the device key."""

    device_id: str = wire("device_id", TEXT)
    sent_ms: int = wire("sent_ms", NONNEG)
    queue_depth: int = wire("queue_depth", NONNEG)
    queue_bytes: int = wire("queue_bytes", NONNEG)
    disk_free_bytes: int = wire("disk_free_bytes", NONNEG)
    model_version: str = wire("model_version", TEXT, default="")
    state: str = wire("state", TEXT, default="ok")
    signature: bytes = wire("signature", BYTES, default=b"", signed=False)

    TYPE: ClassVar[str] = "heartbeat"
    DOMAIN: ClassVar[str] = f"medchain/v{VERSION}/heartbeat"


# -- enrolment -------------------------------------------------------------------------------


KEY_HEX = Hex(32)


@record("enrollment", tags={"version": VERSION})
@dataclass(frozen=True, slots=True)
class Enrollment(Wire):
    """What the cloud hands a device at enrolment (a JSON file the operator copies to the
    edge, keys in hex): the keys the device must trust. Public keys only: nothing here is
    secret."""

    device_id: str = wire("device_id", TEXT)
    device_key: bytes = wire("device_key", KEY_HEX)  # the device's own Ed25519 key, as enrolled
    ingest_key: bytes = wire("ingest_key", KEY_HEX)  # Ed25519: signs acks (only they release)
    custodian_key: bytes = wire("custodian_key", KEY_HEX)  # X25519: data keys are wrapped for it
    meta_key: bytes = wire("meta_key", KEY_HEX)  # X25519: envelope metadata is sealed for ingest
    model_key: bytes = wire("model_key", KEY_HEX)  # Ed25519: the trainer's model-signing key
    issued_ms: int = wire("issued_ms", NONNEG)
    # the ledger validators' Ed25519 keys (genesis order): a device checks a model's
    # MODEL_RELEASED receipt against them without talking to the ledger; files written
    # before they were added have none
    validators: tuple[bytes, ...] = wire("validators", ListOf(KEY_HEX), default=(),
                                         if_absent=())

    def to_json(self) -> str:
        return json.dumps(self.to_wire(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "enrollment") -> Enrollment:
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError):
            raise ProtocolError(f"{where}: not JSON") from None
        try:
            return cls.SCHEMA.parse(msg)
        except Invalid as exc:
            raise ProtocolError(f"{where}: {exc}") from None


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
    """Parse bytes into a protocol message; :class:`ProtocolError` (and nothing else) says
    what is wrong."""
    try:
        msg = decode(data)
    except EncodingError:
        raise ProtocolError("not a protocol message: malformed CBOR") from None
    if type(msg) is not dict:
        raise ProtocolError("message: expected a map")
    version = msg.get("v")
    if type(version) is not int or version != VERSION:
        raise ProtocolError(f"message: unsupported protocol version, expected {VERSION}")
    name = msg.get("type")
    kind = MESSAGE_TYPES.get(name) if type(name) is str else None
    if kind is None:
        raise ProtocolError("message: unknown type")
    if expect is not None and kind is not expect:
        raise ProtocolError(f"message: expected {expect.TYPE}, got {kind.TYPE}")
    return kind.SCHEMA.decode(msg)
