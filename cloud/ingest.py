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

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from medchain.identity import RecipientKey, SigningKey, VerifyKey
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
from medchain.sealing import open_meta, verify

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

    def check(self, envelope: Envelope, meta: Mapping[str, Any]) -> None:
        """Raise :class:`MedChainError` for an envelope the ledger could never register
        (``meta``: its opened metadata)."""

    def register(self, envelope: Envelope, meta: Mapping[str, Any]) -> Receipt:
        """Raise :class:`MedChainError` if the ledger refuses it."""


@dataclass(frozen=True, slots=True)
class Verdict:
    status: str  # an AckStatus value, "accept", or "drop" (no ack: not the device's own word)
    reason: str = ""
    receipt: Receipt | None = None

    ACCEPT = "accept"
    DROP = "drop"


def judge(
    envelope: Envelope,
    topic_device: str,
    device: DeviceRecord | None,
    prior: CatalogEntry | None,
    sequence_owner: str | None,
) -> Verdict:
    """Decide what to do with an envelope, without touching anything.

    Only an envelope signed by the topic's enrolled device, bodies intact, earns an ack of
    any kind: anything else (unknown device, a signature or a chunk that does not verify) is
    dropped unanswered, because a signed ``rejected`` would make the device give up an
    envelope that someone else forged or tampered with; its own copy is resent."""
    header = envelope.header
    if device is None:
        return Verdict(Verdict.DROP, f"unknown device {topic_device!r}")
    try:
        verify(envelope, device.public_key)
    except (VerificationError, ProtocolError) as exc:
        return Verdict(Verdict.DROP, str(exc))
    if header.device_id != topic_device:
        return Verdict(AckStatus.REJECTED, f"envelope names device {header.device_id!r} "
                                           f"but came on the topic of {topic_device!r}")
    if device.revoked:
        return Verdict(AckStatus.REJECTED, f"device {header.device_id!r} is revoked")
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
    # dropped unanswered: not provably the device's (unknown, bad signature or chunk), too
    # large to decode, or over the device's rate
    unauthenticated: int = 0
    oversize: int = 0
    rate_limited: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class _Inbox:
    """Messages waiting for a worker, bounded by their total size (the MQTT thread waits
    when it is full, so the broker holds the rest): a count bound alone let 256 messages of
    up to the broker's limit each sit here unauthenticated."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: collections.deque = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()

    def put(self, item) -> None:
        size = len(item[1]) if item is not None else 0
        with self._cond:
            while self._items and self._bytes + size > self.max_bytes:
                self._cond.wait()
            self._items.append(item)
            self._bytes += size
            self._cond.notify_all()

    def get(self):
        with self._cond:
            while not self._items:
                self._cond.wait()
            item = self._items.popleft()
            self._bytes -= len(item[1]) if item is not None else 0
            self._cond.notify_all()
            return item


class _RateLimit:
    """A token bucket per device: a device that publishes faster than ``rate`` messages per
    second (beyond a ``burst``) has the excess dropped unanswered (its edge resends later).
    At most ``max_devices`` buckets are kept: the least recently seen go first."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float], max_devices: int = 100_000):
        self.rate, self.burst, self._clock, self.max_devices = rate, burst, clock, max_devices
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def allow(self, device: str) -> bool:
        now = self._clock()
        with self._lock:
            tokens, then = self._buckets.pop(device, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[device] = (tokens - 1.0 if allowed else tokens, now)
            if len(self._buckets) > self.max_devices:
                self._buckets.popitem(last=False)
            return allowed


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
        meta_key: RecipientKey,
        shared_group: str | None = None,
        workers: int = 1,
        client_id: str | None = None,
        clock: Callable[[], float] = time.time,
        on_stored: Callable[[CatalogEntry], object] | None = None,
        known: Callable[[str], bool] | None = None,
        rate: float = 200.0,
        burst: float = 400.0,
        inbox_bytes: int = 256 * 1024**2,
    ):
        """``meta_key`` opens the metadata devices seal for ingest; ``known(device_id)``:
        whether the fleet registry holds the device (a cheap local check before any ledger
        query; None: ask the directory for every device)."""
        self.directory = directory
        self._known = known
        self._max_message = endpoint.max_message_bytes
        self._rate = _RateLimit(rate, burst, clock)
        self._on_stored = on_stored
        self.store = store
        self.catalog = catalog
        self.registrar = registrar
        self._key = ingest_key
        self._meta_key = meta_key
        self._clock = clock
        self._workers = workers
        self.stats = IngestStats()
        self._inbox = _Inbox(inbox_bytes)
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
        """Process one MQTT message; returns the ack it sent (None if none was due). Work
        before authentication is bounded: size first, then the device's rate, then whether
        the device is known, all before a byte is decoded."""
        try:
            device_id = device_from_topic(topic)
        except MedChainError:
            return self._drop("malformed", topic, "not a device topic")
        if len(payload) > self._max_message:
            return self._drop("oversize", topic, f"{len(payload)} bytes over the {self._max_message} limit")
        if not self._rate.allow(device_id):
            return self._drop("rate_limited", topic, "over the device's message rate")
        if self._known is not None and not self._known(device_id):
            return self._drop("unauthenticated", topic, "device not in the fleet registry")
        try:
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

    def _drop(self, counter: str, topic: str, why: str) -> None:
        with self._stats_lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        log.warning("ingest: message on %s dropped: %s", topic, why)
        return None

    def _store_and_register(self, envelope: Envelope) -> Verdict:
        """Store, register, catalogue. A refusal by the ledger withdraws what was stored; a
        crash or a ledger timeout leaves it for the edge's resend to finish (idempotent)."""
        header = envelope.header
        try:
            meta = open_meta(header, self._meta_key)  # after the signature: the device's own word
            self.registrar.check(envelope, meta)
        except MedChainError as exc:
            return Verdict(AckStatus.REJECTED, str(exc))
        created = self.store.put(envelope)
        try:
            receipt = self.registrar.register(envelope, meta)
        except RegistrationRefused as exc:
            if created:
                self.store.withdraw(envelope.envelope_id)
            return Verdict(AckStatus.REJECTED, str(exc))
        entry = CatalogEntry(
            envelope.envelope_id, header.device_id, header.sequence, header.merkle_root.hex(),
            envelope.size, int(self._clock() * 1000), receipt, meta,
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

    def _ingest(self, device_id: str, envelope: Envelope) -> Ack | None:
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
            elif verdict.status == Verdict.DROP:
                self.stats.unauthenticated += 1
            else:
                self.stats.rejected += 1
            if verdict.status not in (AckStatus.STORED, AckStatus.DUPLICATE):
                self.stats.reasons[verdict.reason] = self.stats.reasons.get(verdict.reason, 0) + 1
        if verdict.status == Verdict.DROP:
            log.warning("ingest: dropped envelope %s on the topic of %s unanswered: %s",
                        envelope.envelope_id, device_id, verdict.reason)
            return None
        if verdict.status not in (AckStatus.STORED, AckStatus.DUPLICATE):
            log.warning("ingest: rejected envelope %s from %s: %s",
                        envelope.envelope_id, device_id, verdict.reason)
        ack = Ack(
            envelope_id=envelope.envelope_id,
            header_hash=header.digest(),
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
