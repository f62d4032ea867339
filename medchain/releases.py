"""Model rollout on the wire (part of protocol v1; import it through :mod:`medchain.protocol`):
the release a training service signs, the offer that tells one device which release to run,
and the device's signed answer — and the topics they travel on (all retained).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

from medchain.errors import ProtocolError
from medchain.fields import BYTES, MAP, TEXT, Choice, MapOf, Optional, wire
from medchain.wire import DIGEST, NONNEG, TOPIC_PREFIX, VERSION, Signed, message

__all__ = ["VARIANT_PRECISIONS", "SERVED_PRECISIONS", "model_offer_topic", "model_status_topic", "model_status_subscription", "release_topic",
           "ModelRelease", "OfferStage", "ModelOffer", "ModelState", "ModelStatus"]


# the lower-precision exports a release may carry beside its FP32 ``onnx`` (the model card
# lists each one's file and SHA-256), and every precision a device may serve
VARIANT_PRECISIONS = ("fp16", "int8")
SERVED_PRECISIONS = ("fp32", *VARIANT_PRECISIONS)


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


@message("model release")
@dataclass(frozen=True, slots=True)
class ModelRelease(Signed):
    """A released model: the ONNX file and its model card, signed by the training service's
    key over their hashes (so the signature stays small and the bytes are checked against
    it). ``variants`` holds lower-precision exports of the same model (precision -> ONNX
    bytes; empty, and then absent from the wire, when the release carries none): unsigned,
    each bound by the SHA-256 the signed card lists for its precision. ``receipt`` is the ledger's proof that ``MODEL_RELEASED`` for this hash executed
    successfully (:class:`ledger.receipts.TxReceipt` wire form: request and result, each
    proven under its block header, the header vouched for by f + 1 validators); it needs no
    signature of ours, being checkable against the validators' keys alone."""

    name: str = wire("name", TEXT)
    version: str = wire("version", TEXT)
    model_hash: bytes = wire("model_hash", DIGEST)  # SHA-256 of ``onnx``
    card_hash: bytes = wire("card_hash", DIGEST)  # SHA-256 of ``card``
    # id of the signing key, so a device can say "unknown key" rather than "bad"
    key_id: str = wire("key_id", TEXT)
    released_ms: int = wire("released_ms", NONNEG)
    onnx: bytes = wire("onnx", BYTES, default=b"", signed=False)
    card: bytes = wire("card", BYTES, default=b"", signed=False)
    receipt: dict | None = wire("receipt", Optional(MAP), default=None, signed=False)
    signature: bytes = wire("signature", BYTES, default=b"", signed=False)
    variants: dict = wire("variants", MapOf(Choice(*VARIANT_PRECISIONS), BYTES),
                          default_factory=dict, if_absent={}, omit=True, signed=False)

    TYPE: ClassVar[str] = "model_release"
    DOMAIN: ClassVar[str] = f"medchain/v{VERSION}/model-release"

    def check_contents(self) -> None:
        """Raise :class:`ProtocolError` unless the bytes are the ones the hashes name."""
        if hashlib.sha256(self.onnx).digest() != self.model_hash:
            raise ProtocolError("model release: the ONNX file does not match its signed hash")
        if hashlib.sha256(self.card).digest() != self.card_hash:
            raise ProtocolError("model release: the model card does not match its signed hash")

    def check_variants(self, listed: dict[str, str]) -> None:
        """Raise :class:`ProtocolError` unless every variant carried is one ``listed`` (the
        signed card's ``{precision: SHA-256 hex}``) names, with exactly those bytes."""
        for precision, data in self.variants.items():
            if precision not in listed:
                raise ProtocolError(f"model release: its card lists no {precision} variant")
            if hashlib.sha256(data).hexdigest() != listed[precision]:
                raise ProtocolError(f"model release: the {precision} variant does not match "
                                    "the hash its signed card lists")


class OfferStage:
    CANARY = "canary"  # the first share of a group
    FLEET = "fleet"  # the rest, once the canaries report healthy
    ROLLBACK = "rollback"  # back to an earlier release
    ALL = (CANARY, FLEET, ROLLBACK)


@message("model offer")
@dataclass(frozen=True, slots=True)
class ModelOffer(Signed):
    """The cloud tells one device which release to run (retained on its offer topic).

    Freshness: ``issued_ms`` rises with every offer to a device, and ``release_sequence`` is
    the ledger height of the release's MODEL_RELEASED, so releases are ordered: a device
    refuses an offer not newer than the last it accepted (a replay) and one for a release
    older than the one it runs unless its ``stage`` is a (signed) rollback."""

    device_id: str = wire("device_id", TEXT)
    group: str = wire("group", TEXT)
    model_hash: bytes = wire("model_hash", DIGEST)
    version: str = wire("version", TEXT)
    stage: str = wire("stage", Choice(*OfferStage.ALL))
    issued_ms: int = wire("issued_ms", NONNEG)
    release_sequence: int = wire("release_sequence", NONNEG)
    signature: bytes = wire("signature", BYTES, default=b"", signed=False)

    TYPE: ClassVar[str] = "model_offer"
    DOMAIN: ClassVar[str] = f"medchain/v{VERSION}/model-offer"


class ModelState:
    INSTALLED = "installed"  # verified, smoke-tested and serving
    REFUSED = "refused"  # not installed; ``reason`` says why; the previous model still serves
    ALL = (INSTALLED, REFUSED)


@message("model status")
@dataclass(frozen=True, slots=True)
class ModelStatus(Signed):
    """A device's answer to an offer, signed by the device key (retained on its status topic)."""

    device_id: str = wire("device_id", TEXT)
    model_hash: bytes = wire("model_hash", DIGEST)
    version: str = wire("version", TEXT)
    state: str = wire("state", Choice(*ModelState.ALL))
    reason: str = wire("reason", TEXT)
    serving: str = wire("serving", TEXT)  # the version now serving ("" when none)
    sent_ms: int = wire("sent_ms", NONNEG)
    signature: bytes = wire("signature", BYTES, default=b"", signed=False)
    # the precision of the model now serving ("" when none, and then absent from the wire);
    # an installed status whose precision is not the one the profile asks for says why in
    # ``reason``
    precision: str = wire("precision", Choice("", *SERVED_PRECISIONS), default="",
                          if_absent="", omit=True)

    TYPE: ClassVar[str] = "model_status"
    DOMAIN: ClassVar[str] = f"medchain/v{VERSION}/model-status"
