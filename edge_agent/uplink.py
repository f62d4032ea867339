"""The uplink: drains the outbox to the broker and releases what the cloud acknowledges.

Delivery is at-least-once: an envelope is published (QoS 1, split into fragments when it is
larger than the broker's message limit) and published again if no ack arrives within
``resend_after_s``; the cloud stores by envelope id, so a repeat is answered ``duplicate``.
Only a signed ack from the cloud's ingest key releases an envelope: anybody else on the
broker can publish to our ack topic, but cannot make us drop data. A rejection moves the
envelope aside with its reason. Heartbeats (retained, signed) report queue depth, disk space
and model version.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from medchain.identity import SigningKey, VerifyKey
from medchain.errors import MedChainError
from medchain.mqtt import LinkError, MqttEndpoint, MqttLink
from medchain.protocol import (
    Ack,
    Heartbeat,
    ack_topic,
    decode_message,
    encode,
    envelope_topic,
    fragment,
    heartbeat_topic,
)

from edge_agent.outbox import Outbox

__all__ = ["Uplink", "UplinkSettings", "UplinkStats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UplinkSettings:
    window: int = 32  # envelopes published and not yet acked
    resend_after_s: float = 30.0
    heartbeat_s: float = 30.0
    idle_poll_s: float = 0.05


@dataclass(slots=True)
class UplinkStats:
    published: int = 0
    republished: int = 0
    released: int = 0
    rejected: int = 0
    bad_acks: int = 0
    unmatched_acks: int = 0  # signed by the cloud, but for no envelope held here with that header
    heartbeats: int = 0
    last_error: str = ""
    reasons: dict[str, int] = field(default_factory=dict)


class Uplink:
    """A context manager running one background thread; see the module docstring."""

    def __init__(
        self,
        outbox: Outbox,
        endpoint: MqttEndpoint,
        *,
        device_id: str,
        device_key: SigningKey,
        cloud_key: VerifyKey,
        settings: UplinkSettings = UplinkSettings(),
        model_version: Callable[[], str] = lambda: "",
        clock: Callable[[], float] = time.time,
    ):
        self.outbox = outbox
        self.device_id = device_id
        self._device_key = device_key
        self._cloud_key = cloud_key
        self.settings = settings
        self._model_version = model_version
        self._clock = clock
        self.stats = UplinkStats()
        self._acks: queue.Queue[bytes] = queue.Queue()
        self._inflight: dict[int, float] = {}  # sequence -> when published
        self._published: set[int] = set()  # sequences published at least once (stats)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_heartbeat = 0.0
        self.link = MqttLink(
            endpoint,
            client_id=f"edge-{device_id}",
            subscriptions=[(ack_topic(device_id), 1)],
            on_message=lambda topic, payload: (self._acks.put(payload), self._wake.set()),
        )

    def __enter__(self) -> Uplink:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.link.start()
        self._thread = threading.Thread(target=self._run, name=f"uplink-{self.device_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)
        self.link.close()

    def nudge(self) -> None:
        """Something new is in the outbox: look now rather than at the next poll."""
        self._wake.set()

    def wait_drained(self, timeout: float) -> bool:
        """Block until the outbox is empty (everything acked) or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while self.outbox.depth and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.outbox.depth == 0

    # -- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain_acks()
                if self.link.connected:
                    self._publish_due()
                    self._heartbeat()
            except (MedChainError, OSError) as exc:
                self.stats.last_error = str(exc)
                log.warning("uplink: %s", exc)
            self._wake.wait(self.settings.idle_poll_s)
            self._wake.clear()

    def _publish_due(self) -> None:
        now = self._clock()
        # no ack in time: the envelope (or its ack) was lost; it becomes due again
        for s in [s for s, t in self._inflight.items() if now - t >= self.settings.resend_after_s]:
            del self._inflight[s]
        room = self.settings.window - len(self._inflight)
        if room <= 0:
            return
        due = self.outbox.pending(room, skip=self._inflight)
        limit = self.link.endpoint.max_message_bytes
        topic = envelope_topic(self.device_id)
        for entry in due:
            try:
                if entry.size <= limit:
                    self.link.publish(topic, entry.data, qos=1)
                else:
                    for piece in fragment(bytes.fromhex(entry.envelope_id), entry.data, limit):
                        self.link.publish(topic, piece, qos=1)
            except LinkError as exc:
                self.stats.last_error = str(exc)
                return  # broker gone or queue full: try again on the next round
            if entry.sequence in self._published:
                self.stats.republished += 1
            self._published.add(entry.sequence)
            self.stats.published += 1
            self._inflight[entry.sequence] = now

    def _drain_acks(self) -> None:
        while True:
            try:
                payload = self._acks.get_nowait()
            except queue.Empty:
                return
            try:
                ack = decode_message(payload, expect=Ack)
                ack.verify(self._cloud_key)
                if ack.device_id != self.device_id:
                    raise MedChainError(f"ack for device {ack.device_id} on our topic")
            except MedChainError as exc:
                self.stats.bad_acks += 1
                log.warning("uplink: ignored an ack that does not check out: %s", exc)
                continue
            if self.outbox.header_hash(ack.envelope_id) != ack.header_hash:
                # not for an envelope we hold with exactly that header (a stale ack, or one
                # for a forgery under one of our ids): nothing to act on
                self.stats.unmatched_acks += 1
                log.warning("uplink: ignored an ack for envelope %s that matches nothing held here",
                            ack.envelope_id)
                continue
            self._inflight.pop(ack.sequence, None)
            self._published.discard(ack.sequence)
            if ack.releases:
                if self.outbox.release(ack.envelope_id):
                    self.stats.released += 1
            elif self.outbox.reject(ack.envelope_id, ack.reason):
                self.stats.rejected += 1
                self.stats.reasons[ack.reason] = self.stats.reasons.get(ack.reason, 0) + 1
                log.error("cloud rejected envelope %s (sequence %d): %s",
                          ack.envelope_id, ack.sequence, ack.reason)

    def _heartbeat(self) -> None:
        now = self._clock()
        if now - self._last_heartbeat < self.settings.heartbeat_s:
            return
        beat = Heartbeat(
            device_id=self.device_id,
            sent_ms=int(now * 1000),
            queue_depth=self.outbox.depth,
            queue_bytes=self.outbox.queued_bytes,
            disk_free_bytes=self.outbox.disk_free_bytes(),
            model_version=self._model_version(),
        ).signed(self._device_key)
        self.link.publish(heartbeat_topic(self.device_id), encode(beat), qos=1, retain=True)
        self._last_heartbeat = now
        self.stats.heartbeats += 1
