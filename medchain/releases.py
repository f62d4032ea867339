"""Model rollout on the wire (part of protocol v1; import it through :mod:`medchain.protocol`):
the release a training service signs, the offer that tells one device which release to run,
and the device's signed answer — and the topics they travel on (all retained).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from medchain.errors import ProtocolError
from medchain.wire import (
    DIGEST_SIZE,
    TOPIC_PREFIX,
    VERSION,
    Signed,
    as_map,
    fixed_bytes,
    get_field,
    nonneg,
)

__all__ = ["model_offer_topic", "model_status_topic", "model_status_subscription", "release_topic",
           "ModelRelease", "OfferStage", "ModelOffer", "ModelState", "ModelStatus"]


def model_offer_topic(device_id: str) -> str:
    """Retained, cloud -> device: the model this device should run (a :class:`ModelOffer`)."""
    return f"{TOPIC_PREFIX}/devices/{device_id}/model/offer"


def model_status_topic(device_id: str) -> str:
    """Retained, device -> cloud: what became of the last offer (a :class:`ModelStatus`)."""
    return f"{TOPIC_PREFIX}/devices/{device_id}/model/status"


def model_status_subscription() -> str:
    return f"{TOPIC_PREFIX}/devices/+/model/status"


def release_topic(model_hash: bytes) -> str:
    """Retained, cloud -> fleet: a released model's bytes (a :class:`ModelRelease`), published
    once however many devices are offered it."""
    return f"{TOPIC_PREFIX}/models/{model_hash.hex()}"


@dataclass(frozen=True, slots=True)
class ModelRelease(Signed):
    """A released model: the ONNX file and its model card, signed by the training service's
    key over their hashes (so the signature stays small and the bytes are checked against
    it). ``receipt`` is the ledger's proof that ``MODEL_RELEASED`` committed this hash
    (:class:`ledger.receipts.TxReceipt` wire form); it needs no signature of ours, being
    checkable against the validators' keys alone."""

    name: str
    version: str
    model_hash: bytes  # SHA-256 of ``onnx``
    card_hash: bytes  # SHA-256 of ``card``
    key_id: str  # id of the signing key, so a device can say "unknown key" rather than "bad"
    released_ms: int
    onnx: bytes = b""
    card: bytes = b""
    receipt: dict | None = None
    signature: bytes = b""

    TYPE: ClassVar[str] = "model_release"
    DOMAIN: ClassVar[str] = f"medchain/v{VERSION}/model-release"

    def body(self) -> dict:
        return {"name": self.name, "version": self.version, "model_hash": self.model_hash,
                "card_hash": self.card_hash, "key_id": self.key_id,
                "released_ms": self.released_ms}

    def to_wire(self) -> dict:
        return {**self.body(), "onnx": self.onnx, "card": self.card, "receipt": self.receipt,
                "signature": self.signature}

    @classmethod
    def from_wire(cls, msg: Mapping) -> ModelRelease:
        where = "model release"
        receipt = msg.get("receipt")
        if receipt is not None:
            receipt = dict(as_map(receipt, f"{where} receipt"))
        return cls(
            name=get_field(msg, "name", str, where), version=get_field(msg, "version", str, where),
            model_hash=fixed_bytes(msg, "model_hash", DIGEST_SIZE, where),
            card_hash=fixed_bytes(msg, "card_hash", DIGEST_SIZE, where),
            key_id=get_field(msg, "key_id", str, where), released_ms=nonneg(msg, "released_ms", where),
            onnx=get_field(msg, "onnx", bytes, where), card=get_field(msg, "card", bytes, where),
            receipt=receipt, signature=get_field(msg, "signature", bytes, where),
        )

    def check_contents(self) -> None:
        """Raise :class:`ProtocolError` unless the bytes are the ones the hashes name."""
        if hashlib.sha256(self.onnx).digest() != self.model_hash:
            raise ProtocolError("model release: the ONNX file does not match its signed hash")
        if hashlib.sha256(self.card).digest() != self.card_hash:
            raise ProtocolError("model release: the model card does not match its signed hash")


class OfferStage:
    CANARY = "canary"  # the first share of a group
    FLEET = "fleet"  # the rest, once the canaries report healthy
    ROLLBACK = "rollback"  # back to an earlier release
    ALL = (CANARY, FLEET, ROLLBACK)


@dataclass(frozen=True, slots=True)
class ModelOffer(Signed):
    """The cloud tells one device which release to run (retained on its offer topic)."""

    device_id: str
    group: str
    model_hash: bytes
    version: str
    stage: str
    issued_ms: int
    signature: bytes = b""

    TYPE: ClassVar[str] = "model_offer"
    DOMAIN: ClassVar[str] = f"medchain/v{VERSION}/model-offer"

    def body(self) -> dict:
        return {"device_id": self.device_id, "group": self.group, "model_hash": self.model_hash,
                "version": self.version, "stage": self.stage, "issued_ms": self.issued_ms}

    @classmethod
    def from_wire(cls, msg: Mapping) -> ModelOffer:
        where = "model offer"
        offer = cls(
            device_id=get_field(msg, "device_id", str, where), group=get_field(msg, "group", str, where),
            model_hash=fixed_bytes(msg, "model_hash", DIGEST_SIZE, where),
            version=get_field(msg, "version", str, where), stage=get_field(msg, "stage", str, where),
            issued_ms=nonneg(msg, "issued_ms", where),
            signature=get_field(msg, "signature", bytes, where),
        )
        if offer.stage not in OfferStage.ALL:
            raise ProtocolError(f"model offer: unknown stage {offer.stage!r}")
        return offer


class ModelState:
    INSTALLED = "installed"  # verified, smoke-tested and serving
    REFUSED = "refused"  # not installed; ``reason`` says why; the previous model still serves
    ALL = (INSTALLED, REFUSED)


@dataclass(frozen=True, slots=True)
class ModelStatus(Signed):
    """A device's answer to an offer, signed by the device key (retained on its status topic)."""

    device_id: str
    model_hash: bytes
    version: str
    state: str
    reason: str
    serving: str  # the version now serving ("" when none)
    sent_ms: int
    signature: bytes = b""

    TYPE: ClassVar[str] = "model_status"
    DOMAIN: ClassVar[str] = f"medchain/v{VERSION}/model-status"

    def body(self) -> dict:
        return {"device_id": self.device_id, "model_hash": self.model_hash,
                "version": self.version, "state": self.state, "reason": self.reason,
                "serving": self.serving, "sent_ms": self.sent_ms}

    @classmethod
    def from_wire(cls, msg: Mapping) -> ModelStatus:
        where = "model status"
        status = cls(
            device_id=get_field(msg, "device_id", str, where),
            model_hash=fixed_bytes(msg, "model_hash", DIGEST_SIZE, where),
            version=get_field(msg, "version", str, where), state=get_field(msg, "state", str, where),
            reason=get_field(msg, "reason", str, where), serving=get_field(msg, "serving", str, where),
            sent_ms=nonneg(msg, "sent_ms", where),
            signature=get_field(msg, "signature", bytes, where),
        )
        if status.state not in ModelState.ALL:
            raise ProtocolError(f"model status: unknown state {status.state!r}")
        return status
