"""Cloud ingest: verify each envelope, store it once, register it on the ledger, then ack.

The decision is a pure function (:func:`judge`): the envelope, what the device directory and
the catalog know, in; a verdict out. The service around it is the shell: MQTT in (a shared
subscription where the broker supports it, so several workers share the load), fragments
reassembled, object store and ledger out, a signed ack back to the device.

Order matters for exactly-once: ciphertext is stored first (idempotent, content-addressed),
then the ledger transaction (idempotent by envelope id), then the catalog row, then the ack.
A crash anywhere in between is repaired by the edge's resend: every step repeats harmlessly.
Nothing is acked ``stored`` before the ledger committed it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from medchain.identity import SigningKey, VerifyKey
from medchain.errors import MedChainError, ProtocolError, VerificationError
from medchain.mqtt import MqttEndpoint, MqttLink
from medchain.protocol import (
    Ack,
    AckStatus,
    Envelope,
    Fragment,
    ack_topic,
    decode_message,
    device_from_topic,
    encode,
    envelope_subscription,
)
from medchain.sealing import verify

from cloud.catalog import Catalog, CatalogEntry, Receipt
from cloud.errors import RegistrationRefused
from cloud.objectstore import ObjectStore
from cloud.reassembly import Reassembler, SharedReassembler

__all__ = [
    "DeviceRecord",
    "DeviceDirectory",
    "Registrar",
    "Verdict",
    "judge",
    "IngestService",
    "IngestStats",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: str
    public_key: VerifyKey
    revoked: bool = False


class DeviceDirectory(Protocol):
    """Who is enrolled (the ledger is the source of truth)."""

    def lookup(self, device_id: str) -> DeviceRecord | None: ...


class Registrar(Protocol):
    """Records ``IMAGE_REGISTERED`` and returns once it is committed (idempotent by id)."""

    def check(self, envelope: Envelope) -> None:
        """Raise :class:`MedChainError` for an envelope the ledger could never register."""

    def register(self, envelope: Envelope) -> Receipt:
        """Raise :class:`MedChainError` if the ledger refuses it."""


@dataclass(frozen=True, slots=True)
class Verdict:
    status: str  # an AckStatus value, or "accept"
    reason: str = ""
    receipt: Receipt | None = None

    ACCEPT = "accept"


def judge(
    envelope: Envelope,
    topic_device: str,
    device: DeviceRecord | None,
    prior: CatalogEntry | None,
    sequence_owner: str | None,
) -> Verdict:
    """Decide what to do with an envelope, without touching anything."""
    header = envelope.header
    if header.device_id != topic_device:
        return Verdict(AckStatus.REJECTED, f"envelope names device {header.device_id!r} "
                                           f"but came on the topic of {topic_device!r}")
    if device is None:
        return Verdict(AckStatus.REJECTED, f"unknown device {header.device_id!r}")
    if device.revoked:
        return Verdict(AckStatus.REJECTED, f"device {header.device_id!r} is revoked")
    try:
        verify(envelope, device.public_key)
    except (VerificationError, ProtocolError) as exc:
        return Verdict(AckStatus.REJECTED, str(exc))
    if prior is not None:
        return Verdict(AckStatus.DUPLICATE, "already stored", prior.receipt)
    if sequence_owner is not None and sequence_owner != envelope.envelope_id:
        return Verdict(AckStatus.REJECTED, f"sequence {header.sequence} was already used by "
                                           f"envelope {sequence_owner}")
    return Verdict(Verdict.ACCEPT)


@dataclass(slots=True)
class IngestStats:
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    malformed: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class IngestService:
    """Subscribes, judges, stores, registers and acks; ``workers`` threads in this process.

    Alone (no ``shared_group``) the service keeps a persistent session under a stable client
    id, so the broker holds envelopes for it while it restarts. In a shared group every
    member connects with its own id and a clean session: members share one ingest key, so a
    stable id would make them take each other's session over, and a broker such as Mosquitto
    keeps dealing an offline persistent member its share of the group's messages, which would
    then wait for that member to come back. A clean member leaves the group when it stops; the
    edge resends whatever no member acknowledged.
    """

    def __init__(
        self,
        endpoint: MqttEndpoint,
        *,
        directory: DeviceDirectory,
        store: ObjectStore,
        catalog: Catalog,
        registrar: Registrar,
        ingest_key: SigningKey,
        shared_group: str | None = None,
        workers: int = 1,
        client_id: str | None = None,
        clock: Callable[[], float] = time.time,
        on_stored: Callable[[CatalogEntry], object] | None = None,
    ):
        self.directory = directory
        self._on_stored = on_stored
        self.store = store
        self.catalog = catalog
        self.registrar = registrar
        self._key = ingest_key
        self._clock = clock
        self._workers = workers
        self.stats = IngestStats()
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=256)
        # in a group the broker deals an envelope's fragments to different members
        self._reassembler = SharedReassembler(catalog.engine) if shared_group else Reassembler()
        self._reassembly_lock = threading.Lock()
        self._stats_lock = threading.Lock()  # workers count concurrently; += is not atomic
        self._threads: list[threading.Thread] = []
        if client_id is None:
            client_id = f"ingest-{ingest_key.public.id[:8]}"
            if shared_group:
                client_id += f"-{uuid.uuid4().hex[:8]}"
        self.link = MqttLink(
            endpoint,
            client_id=client_id,
            subscriptions=[(envelope_subscription(shared_group), 1)],
            on_message=lambda topic, payload: self._inbox.put((topic, payload)),
            persistent_session=not shared_group,
        )

    @property
    def public_key(self) -> VerifyKey:
        return self._key.public

    def __enter__(self) -> IngestService:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        for i in range(self._workers):
            t = threading.Thread(target=self._work, name=f"ingest-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        self.link.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.link.close()
        for _ in self._threads:
            self._inbox.put(None)
        for t in self._threads:
            t.join(timeout)

    # -- work -----------------------------------------------------------------------------

    def _work(self) -> None:
        while (item := self._inbox.get()) is not None:
            topic, payload = item
            try:
                self.handle(topic, payload)
            except Exception:  # keep serving; the edge resends whatever was not acked
                with self._stats_lock:
                    self.stats.failed += 1
                log.exception("ingest: failed on a message from %s; it will be resent", topic)

    def handle(self, topic: str, payload: bytes) -> Ack | None:
        """Process one MQTT message; returns the ack it sent (None if none was due)."""
        try:
            device_id = device_from_topic(topic)
            message = decode_message(payload)
            if isinstance(message, Fragment):
                with self._reassembly_lock:
                    whole = self._reassembler.add(device_id, message, int(self._clock() * 1000))
                if whole is None:
                    return None
                message = decode_message(whole, expect=Envelope)
            if not isinstance(message, Envelope):
                raise ProtocolError(f"{message.TYPE} is not accepted on an envelope topic")
        except MedChainError as exc:
            with self._stats_lock:
                self.stats.malformed += 1
            log.warning("ingest: unreadable message on %s: %s", topic, exc)
            return None
        return self._ingest(device_id, message)

    def _store_and_register(self, envelope: Envelope) -> Verdict:
        """Store, register, catalogue. A refusal by the ledger withdraws what was stored; a
        crash or a ledger timeout leaves it for the edge's resend to finish (idempotent)."""
        header = envelope.header
        try:
            self.registrar.check(envelope)
        except MedChainError as exc:
            return Verdict(AckStatus.REJECTED, str(exc))
        created = self.store.put(envelope)
        try:
            receipt = self.registrar.register(envelope)
        except RegistrationRefused as exc:
            if created:
                self.store.withdraw(envelope.envelope_id)
            return Verdict(AckStatus.REJECTED, str(exc))
        entry = CatalogEntry(
            envelope.envelope_id, header.device_id, header.sequence, header.merkle_root.hex(),
            envelope.size, int(self._clock() * 1000), receipt, dict(header.meta),
        )
        if not self.catalog.record(entry):  # another worker, here or in a sibling service, got there first
            prior = self.catalog.get(envelope.envelope_id)
            if prior is None:  # not this envelope: another one took its sequence meanwhile
                owner = self.catalog.by_sequence(header.device_id, header.sequence)
                return Verdict(AckStatus.REJECTED, f"sequence {header.sequence} was already used "
                                                   f"by envelope {owner}")
            return Verdict(AckStatus.DUPLICATE, "already stored", prior.receipt)
        if self._on_stored is not None:
            try:
                self._on_stored(entry)
            except Exception:  # stored and registered already: the ack must still go out
                log.exception("ingest: after-store hook failed for %s", envelope.envelope_id)
        return Verdict(AckStatus.STORED, "", receipt)

    def _ingest(self, device_id: str, envelope: Envelope) -> Ack:
        header = envelope.header
        verdict = judge(
            envelope,
            device_id,
            self.directory.lookup(header.device_id),
            self.catalog.get(envelope.envelope_id),
            self.catalog.by_sequence(header.device_id, header.sequence),
        )
        if verdict.status == Verdict.ACCEPT:
            verdict = self._store_and_register(envelope)
        with self._stats_lock:
            if verdict.status == AckStatus.STORED:
                self.stats.stored += 1
            elif verdict.status == AckStatus.DUPLICATE:
                self.stats.duplicates += 1
            else:
                self.stats.rejected += 1
                self.stats.reasons[verdict.reason] = self.stats.reasons.get(verdict.reason, 0) + 1
        if verdict.status not in (AckStatus.STORED, AckStatus.DUPLICATE):
            log.warning("ingest: rejected envelope %s from %s: %s",
                        envelope.envelope_id, device_id, verdict.reason)
        ack = Ack(
            envelope_id=envelope.envelope_id,
            device_id=device_id,
            sequence=header.sequence,
            status=verdict.status,
            reason=verdict.reason,
            ledger_height=verdict.receipt.ledger_height if verdict.receipt else -1,
            tx_index=verdict.receipt.tx_index if verdict.receipt else -1,
            sent_ms=int(self._clock() * 1000),
        ).signed(self._key)
        self.link.publish(ack_topic(device_id), encode(ack), qos=1)
        return ack
