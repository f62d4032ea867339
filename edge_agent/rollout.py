"""The edge side of model rollout: verify a released model, install it beside the running
one, smoke-test it, swap atomically — or refuse and keep serving the old one.

Trust comes from three independent checks, all before the file is ever loaded:

* the release is signed by the training service's key named in the enrolment file (an
  unsigned release, or one signed by any other key, is refused);
* the ONNX file and card hash to the values that signature covers (a tampered byte is
  refused), and the card names the same ONNX hash; each lower-precision variant the release
  carries hashes to the SHA-256 the signed card lists for its precision (a variant the card
  does not list, or one altered in transit, refuses the whole release);
* the ledger executed ``MODEL_RELEASED`` for that hash successfully: the release carries the
  transaction's receipt (the request and its result, each with an inclusion proof under the
  block header, the commit certificate and f + 1 validator signatures on the header), checked
  against the validators' keys from the enrolment file, so the device needs no connection to
  the ledger. A transaction the contracts rejected is committed too, but its receipt proves
  the rejection and is refused.

:func:`check_release` is the pure core. :class:`ModelManager` is the shell: it listens on
the device's retained offer topic, fetches the release from its retained topic (or the local
cache, for a rollback), writes it to ``models_dir/<hash>/``, loads and smoke-tests the
precision the profile asks for (``[inference] precision``: ``model.int8.onnx`` or
``model.fp16.onnx`` beside ``model.onnx``; FP32, said plainly, when the release carries no
such variant), swaps,
remembers the choice in ``models_dir/current.json`` (rename, so a crash leaves the old or the
new pointer, never half of one) and reports a signed :class:`ModelStatus` either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medchain.errors import MedChainError, ProtocolError, SignatureInvalid, VerificationError
from medchain.durable import durable_write, fsync_dir
from medchain.identity import SigningKey, VerifyKey
from ledger.quorum import Keyring
from ledger.receipts import TxReceipt
from medchain.mqtt import LinkError, MqttEndpoint, MqttLink
from medchain.protocol import (
    ModelOffer,
    ModelRelease,
    ModelState,
    ModelStatus,
    OfferStage,
    SERVED_PRECISIONS,
    decode_message,
    encode,
    model_offer_topic,
    model_status_topic,
    release_topic,
)
from models.card import ModelCard
from models.errors import ModelError

from edge_agent.errors import EdgeError
from edge_agent.inference import DEFAULT_PROVIDERS, EdgeModel

__all__ = ["ReleaseRefused", "ReleaseTrust", "check_offer", "check_release", "check_ledger_record",
           "smoke_test", "variant_file",
           "ModelManager", "InstalledModel"]

log = logging.getLogger(__name__)


class ReleaseRefused(EdgeError):
    """A model release this device will not run; ``reason`` is what it reports upstream."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ReleaseTrust:
    """What a device trusts, from its enrolment file."""

    model_key: VerifyKey
    keyring: Keyring | None  # the ledger validators; None when the enrolment carried none

    @classmethod
    def from_enrollment(cls, enrollment) -> ReleaseTrust:
        keys = list(enrollment.validators)
        return cls(VerifyKey(enrollment.model_key), Keyring(keys) if keys else None)


def check_offer(offer: ModelOffer, device_id: str, trust: ReleaseTrust) -> None:
    if offer.device_id != device_id:
        raise ReleaseRefused(f"offer is addressed to {offer.device_id!r}, not to this device")
    try:
        offer.verify(trust.model_key)
    except SignatureInvalid:
        raise ReleaseRefused("offer is not signed by the model-signing key") from None


@dataclass(frozen=True)
class Freshness:
    """What a device remembers of offers, so an old one cannot be played back to it: the
    newest offer it accepted, and the release sequence (MODEL_RELEASED height) it runs."""

    last_offer_ms: int = -1
    release_sequence: int = -1


def check_fresh(offer: ModelOffer, seen: Freshness) -> None:
    """Refuse a replayed offer, and a downgrade that is not a signed rollback. Pure. The last
    offer accepted may come again (it is retained on the broker): that changes nothing."""
    if offer.issued_ms < seen.last_offer_ms:
        raise ReleaseRefused("offer is older than the last one accepted (a replayed offer)")
    if offer.release_sequence < seen.release_sequence and offer.stage != OfferStage.ROLLBACK:
        raise ReleaseRefused("offer is for a release older than the one running and is not a "
                             "signed rollback")


def release_sequence(release: ModelRelease) -> int | None:
    """The ledger height of a release's MODEL_RELEASED (None without a receipt)."""
    if release.receipt is None:
        return None
    try:
        return TxReceipt.from_wire(release.receipt).header.height
    except MedChainError:
        return None


def check_release(release: ModelRelease, model_hash: bytes, trust: ReleaseTrust) -> ModelCard:
    """The release's card if the release may be installed; :class:`ReleaseRefused` says why
    not. Pure: no file, clock or network."""
    if release.model_hash != model_hash:
        raise ReleaseRefused(f"release is for model {release.model_hash.hex()[:12]}, "
                             f"offer named {model_hash.hex()[:12]}")
    if not release.signature:
        raise ReleaseRefused("release is unsigned")
    if release.key_id != trust.model_key.id:
        raise ReleaseRefused(f"release is signed by an unknown key ({release.key_id})")
    try:
        release.verify(trust.model_key)
    except SignatureInvalid:
        raise ReleaseRefused("release signature does not verify") from None
    try:
        release.check_contents()
    except ProtocolError as exc:
        raise ReleaseRefused(f"tampered: {str(exc).removeprefix('model release: ')}") from None
    try:
        card = ModelCard.from_json(release.card.decode("utf-8"), "release card")
    except (ModelError, UnicodeDecodeError) as exc:
        raise ReleaseRefused(f"model card unusable: {exc}") from None
    if card.onnx_sha256 != model_hash.hex():
        raise ReleaseRefused("model card names another ONNX file")
    try:
        release.check_variants({p: v["sha256"] for p, v in card.variants().items()})
    except ProtocolError as exc:
        raise ReleaseRefused(f"tampered: {str(exc).removeprefix('model release: ')}") from None
    check_ledger_record(release.receipt, model_hash, trust)
    return card


def check_ledger_record(receipt: dict | None, model_hash: bytes, trust: ReleaseTrust) -> None:
    """Refuse unless ``receipt`` proves that ``MODEL_RELEASED`` for ``model_hash`` committed,
    checked offline against the validators' keys. Pure."""
    if trust.keyring is None:
        raise ReleaseRefused("no ledger validator keys in the enrolment file: cannot check the "
                             "ledger record (re-enrol the device)")
    if receipt is None:
        raise ReleaseRefused("model hash is not on the ledger (no MODEL_RELEASED receipt)")
    try:
        tx = TxReceipt.from_wire(receipt).verify(trust.keyring)
    except VerificationError as exc:
        raise ReleaseRefused(f"ledger receipt does not verify: {exc}") from None
    if tx.get("type") != "MODEL_RELEASED" or tx.get("model_hash") != model_hash:
        raise ReleaseRefused("model hash is not on the ledger (receipt proves another transaction)")


def smoke_test(model: EdgeModel) -> None:
    """One inference on a synthetic image through the model's own chain: the outputs must be
    finite probabilities over the card's classes. Raises :class:`ReleaseRefused`."""
    c, h, w = model.card.input_shape
    ramp = np.add.outer(np.linspace(0, 1, 2 * h), np.linspace(0, 1, 2 * w)).astype(np.float32)
    image = ramp if c == 1 else np.repeat(ramp[..., None], c, axis=2)
    try:
        pred = model.predict(image * 1000.0)
    except MedChainError as exc:
        raise ReleaseRefused(f"smoke inference failed: {exc}") from None
    except Exception as exc:  # onnxruntime raises its own types
        raise ReleaseRefused(f"smoke inference failed: {type(exc).__name__}: {exc}") from None
    probs = np.asarray(pred.probabilities)
    if probs.shape != (model.card.num_classes,) or not np.all(np.isfinite(probs)) \
            or abs(float(probs.sum()) - 1.0) > 1e-3:
        raise ReleaseRefused("smoke inference gave no valid probabilities")


def variant_file(precision: str) -> str:
    """The file a precision is written to in a release's folder."""
    return "model.onnx" if precision == "fp32" else f"model.{precision}.onnx"


@dataclass(frozen=True)
class InstalledModel:
    model: EdgeModel
    model_hash: bytes
    modality: str | None  # the modality it was trained on; None: unknown (runs on none)
    precision: str = "fp32"  # the variant serving
    note: str = ""  # why it is not the precision the profile asks for ("" when it is)

    @property
    def version(self) -> str:
        return self.model.model_version


class ModelManager:
    """Keeps the serving model and answers offers. ``current`` is read lock-free by the
    packager: a swap is one reference assignment."""

    def __init__(self, models_dir: str | Path, *, device_id: str, device_key: SigningKey,
                 trust: ReleaseTrust, endpoint: MqttEndpoint | None = None,
                 providers: Sequence[str] = DEFAULT_PROVIDERS, threads: int | None = None,
                 precision: str = "fp32", fetch_timeout_s: float = 120.0,
                 clock: Callable[[], float] = time.time):
        if precision not in SERVED_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(SERVED_PRECISIONS)}")
        self.precision = precision  # what the profile asks for
        self.dir = Path(models_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.device_id, self._key, self.trust = device_id, device_key, trust
        self._providers, self._threads = tuple(providers), threads
        self._clock, self._fetch_timeout_s = clock, fetch_timeout_s
        self._current: InstalledModel | None = None
        self._events: queue.Queue = queue.Queue()
        self._waiting: tuple[ModelOffer, float] | None = None  # offer whose release we await
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_status: ModelStatus | None = None
        self.offers_refused = 0  # forged, for another device, replayed, or a downgrade
        self._link = None if endpoint is None else MqttLink(
            endpoint, client_id=f"{device_id}-models", persistent_session=False,
            subscriptions=[(model_offer_topic(device_id), 1)], on_message=self._on_message)
        self.fresh = self._read_freshness()
        self._restore()

    def _read_freshness(self) -> Freshness:
        try:
            return Freshness(**json.loads((self.dir / "freshness.json").read_text()))
        except FileNotFoundError:
            return Freshness()
        except (ValueError, TypeError):
            log.error("%s: unreadable; accepting offers as a new device would", self.dir / "freshness.json")
            return Freshness()

    def _remember(self, fresh: Freshness) -> None:
        self.fresh = fresh
        durable_write(self.dir / "freshness.json", json.dumps(dataclasses.asdict(fresh)).encode())

    # -- what the rest of the agent reads -------------------------------------------------

    @property
    def current(self) -> InstalledModel | None:
        return self._current

    def model_version(self) -> str:
        cur = self._current
        return cur.version if cur else ""

    def serving_precision(self) -> str:
        """The precision of the serving model ("" when none)."""
        cur = self._current
        return cur.precision if cur else ""

    def _serving(self, modality: str) -> InstalledModel | None:
        cur = self._current  # read once: an install may swap it meanwhile
        return cur if cur is not None and cur.modality == modality.upper() else None

    def serves(self, modality: str) -> bool:
        """Whether the serving model was trained on ``modality`` (so :meth:`predict` answers)."""
        return self._serving(modality) is not None

    def predict(self, modality: str, image: np.ndarray) -> dict | None:
        """The serving model's prediction for one image (modality values, (H, W)) as sent
        upstream, if that model was trained on this modality; None otherwise."""
        cur = self._serving(modality)
        if cur is None:
            return None
        return {**cur.model.predict(image).to_dict(), "model_hash": cur.model_hash.hex()}

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="model-manager", daemon=True)
        self._thread.start()
        if self._link is not None:
            self._link.start()

    def stop(self) -> None:
        self._stop.set()
        self._events.put(None)
        if self._thread is not None:
            self._thread.join(10)
        if self._link is not None:
            self._link.close()

    def __enter__(self) -> ModelManager:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- installing -----------------------------------------------------------------------

    def install(self, release: ModelRelease, offer_hash: bytes, report: bool = True) -> ModelStatus:
        """Verify, write, load, smoke-test and swap; or refuse and keep the old model. Returns
        the status (published on the status topic when ``report``)."""
        try:
            card = check_release(release, offer_hash, self.trust)
            precision, note = self._choose(release)
            folder = self._write(release, precision)
            try:
                model = EdgeModel.load(folder / variant_file(precision), card,
                                       providers=self._providers, threads=self._threads)
            except (ModelError, MedChainError) as exc:
                raise ReleaseRefused(f"model fails to load ({precision}): {exc}") from None
            smoke_test(model)
        except ReleaseRefused as exc:
            log.warning("model %s refused: %s (still serving %s)", release.version, exc.reason,
                        self.model_version() or "none")
            return self._status(release.model_hash, release.version, ModelState.REFUSED,
                                exc.reason, report)
        modality = card.data.get("modality") if isinstance(card.data, dict) else None
        self._current = InstalledModel(model, release.model_hash,
                                       modality.upper() if isinstance(modality, str) else None,
                                       precision, note)
        durable_write(self.dir / "current.json", json.dumps(
            {"model_hash": release.model_hash.hex(), "version": release.version,
             "precision": precision}).encode())
        log.info("model %s installed (%s, %s) on %s", release.version,
                 release.model_hash.hex()[:12], precision, ", ".join(model.providers))
        return self._status(release.model_hash, release.version, ModelState.INSTALLED, note, report)

    def _choose(self, release: ModelRelease) -> tuple[str, str]:
        """``(precision to serve, why it is not the one asked for)``: the profile's precision
        when the release carries it, else FP32 with the reason (never a refusal)."""
        if self.precision == "fp32" or self.precision in release.variants:
            return self.precision, ""
        note = (f"profile asks for {self.precision} but release {release.version} carries no "
                f"{self.precision} variant: serving fp32")
        log.warning("model %s: %s", release.version, note)
        return "fp32", note

    def _write(self, release: ModelRelease, precision: str = "fp32") -> Path:
        """``models_dir/<hash>/`` with the release, its ONNX file, the variant served (when
        not FP32) and card (a new folder is filled under a temporary name and renamed, so a
        crash never leaves half a model). The cached release keeps only that variant; a
        folder already there is reused only if every file in it still hashes right."""
        folder = self.dir / release.model_hash.hex()
        kept = {precision: release.variants[precision]} if precision != "fp32" else {}
        cached = encode(dataclasses.replace(release, variants=kept))
        if folder.is_dir() and self._intact(folder, release, kept, cached):
            return folder
        tmp = self.dir / f".{release.model_hash.hex()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        durable_write(tmp / "model.onnx", release.onnx)
        for p, data in kept.items():
            durable_write(tmp / variant_file(p), data)
        durable_write(tmp / "model_card.json", release.card)
        durable_write(tmp / "release.cbor", cached)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        fsync_dir(self.dir)  # the folder's new name must survive a crash too
        return folder

    @staticmethod
    def _intact(folder: Path, release: ModelRelease, kept: dict[str, bytes], cached: bytes) -> bool:
        def same(name: str, data: bytes) -> bool:
            try:
                return hashlib.sha256((folder / name).read_bytes()).digest() \
                    == hashlib.sha256(data).digest()
            except FileNotFoundError:
                return False

        return (same("model.onnx", release.onnx) and same("release.cbor", cached)
                and all(same(variant_file(p), d) for p, d in kept.items()))

    def _cached(self, model_hash: bytes) -> ModelRelease | None:
        path = self.dir / model_hash.hex() / "release.cbor"
        try:
            return decode_message(path.read_bytes(), ModelRelease)
        except (FileNotFoundError, ProtocolError):
            return None

    def _restore(self) -> None:
        """Serve the model chosen before a restart, re-verified from its cached release."""
        try:
            pointer = json.loads((self.dir / "current.json").read_text())
            model_hash = bytes.fromhex(pointer["model_hash"])
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError):
            log.error("%s: unreadable; serving no model until the next offer", self.dir / "current.json")
            return
        release = self._cached(model_hash)
        if release is None:
            log.error("model %s: cached release missing; serving no model", model_hash.hex()[:12])
            return
        status = self.install(release, model_hash, report=False)
        if status.state != ModelState.INSTALLED:
            log.error("model %s no longer verifies (%s); serving no model", release.version, status.reason)

    def _status(self, model_hash: bytes, version: str, state: str, reason: str,
                report: bool = True) -> ModelStatus:
        status = ModelStatus(self.device_id, model_hash, version, state, reason,
                             self.model_version(), int(self._clock() * 1000),
                             precision=self.serving_precision()).signed(self._key)
        self.last_status = status
        if report and self._link is not None:
            try:
                self._link.publish(model_status_topic(self.device_id), encode(status), retain=True)
            except LinkError as exc:  # the next offer (or restart) reports again
                log.warning("could not report model status: %s", exc)
        return status

    # -- offers and releases from the broker ----------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        self._events.put((topic, payload))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._events.get(timeout=0.5)
            except queue.Empty:
                item = ()
            if item is None:
                break
            try:
                if item:
                    self._handle(*item)
                self._check_timeout()
            except Exception:  # one bad message must not stop the manager
                log.exception("model manager: unexpected error")

    def _handle(self, topic: str, payload: bytes) -> None:
        if topic == model_offer_topic(self.device_id):
            try:
                offer = decode_message(payload, ModelOffer)
                check_offer(offer, self.device_id, self.trust)
                check_fresh(offer, self.fresh)
            except (ProtocolError, ReleaseRefused) as exc:
                self.offers_refused += 1
                log.warning("model offer ignored: %s", exc)
                return
            self._remember(dataclasses.replace(self.fresh, last_offer_ms=offer.issued_ms))
            self._offered(offer)
            return
        waiting = self._waiting
        if waiting is None or topic != release_topic(waiting[0].model_hash):
            return
        self._link.unsubscribe(topic)
        self._waiting = None
        try:
            release = decode_message(payload, ModelRelease)
        except ProtocolError as exc:
            self._status(waiting[0].model_hash, waiting[0].version, ModelState.REFUSED,
                         f"release does not decode: {exc}")
            return
        self._install_offered(release, waiting[0])

    def _offered(self, offer: ModelOffer) -> None:
        cur = self._current
        if cur is not None and cur.model_hash == offer.model_hash:
            self._status(offer.model_hash, offer.version, ModelState.INSTALLED, cur.note)
            return
        cached = self._cached(offer.model_hash)
        if cached is not None:  # e.g. a rollback to a model this device ran before
            self._install_offered(cached, offer)
            return
        if self._waiting is not None:
            self._link.unsubscribe(release_topic(self._waiting[0].model_hash))
        self._waiting = (offer, time.monotonic() + self._fetch_timeout_s)
        self._link.subscribe(release_topic(offer.model_hash))

    def _install_offered(self, release: ModelRelease, offer: ModelOffer) -> ModelStatus:
        """Install what ``offer`` names, if its release is the one the offer says (the same
        MODEL_RELEASED height), and remember that sequence once it serves."""
        if release_sequence(release) != offer.release_sequence:
            return self._status(offer.model_hash, offer.version, ModelState.REFUSED,
                                "the release's ledger record is not the one the offer names")
        status = self.install(release, offer.model_hash)
        if status.state == ModelState.INSTALLED:
            self._remember(dataclasses.replace(self.fresh, release_sequence=offer.release_sequence))
        return status

    def _check_timeout(self) -> None:
        waiting = self._waiting
        if waiting is not None and time.monotonic() > waiting[1]:
            self._link.unsubscribe(release_topic(waiting[0].model_hash))
            self._waiting = None
            self._status(waiting[0].model_hash, waiting[0].version, ModelState.REFUSED,
                         "release not available on the broker")
