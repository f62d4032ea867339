"""The edge uplink against real brokers: delivery, fragments, acks that must be genuine,
heartbeats, and a broker that goes away mid-stream.

The cloud side here is played by the test itself through a real MQTT client (subscribe,
reassemble, verify, answer with signed acks); the full cloud ingest path is covered by the
end-to-end tests.
"""

import queue
import threading
import time

import pytest

from cloud.reassembly import Reassembler
from edge_agent.outbox import Outbox, Sealed
from edge_agent.uplink import Uplink, UplinkSettings
from medchain.identity import RecipientKey, SigningKey
from medchain.mqtt import MqttLink
from medchain.protocol import (
    Ack,
    AckStatus,
    Envelope,
    Fragment,
    Heartbeat,
    ack_topic,
    decode_message,
    device_from_topic,
    encode,
    envelope_subscription,
    heartbeat_topic,
)
from medchain.sealing import open_envelope, seal, verify

CUSTODIAN = RecipientKey.generate()
FAST = UplinkSettings(window=8, resend_after_s=2.0, heartbeat_s=0.5, idle_poll_s=0.02)


class CloudPeer:
    """Receives envelopes for real and answers each with an ack signed by ``key``."""

    def __init__(self, endpoint, key: SigningKey, device_key, status=AckStatus.STORED, header_hash=None):
        self.key, self.device_key, self.status = key, device_key, status
        self.header_hash = header_hash  # None: the hash of the header received
        self.received: dict[str, Envelope] = {}
        self.deliveries = 0
        self._reassembler = Reassembler()
        self._lock = threading.Lock()
        self.link = MqttLink(endpoint, subscriptions=[(envelope_subscription(), 1)],
                             on_message=self._on_message, persistent_session=False)

    def _on_message(self, topic, payload):
        device = device_from_topic(topic)
        msg = decode_message(payload)
        with self._lock:
            if isinstance(msg, Fragment):
                whole = self._reassembler.add(device, msg, 0)
                if whole is None:
                    return
                msg = decode_message(whole, expect=Envelope)
            verify(msg, self.device_key)
            self.deliveries += 1
            self.received[msg.envelope_id] = msg
        ack = Ack(msg.envelope_id, self.header_hash or msg.header.digest(), device, msg.header.sequence, self.status,
                  "refused by test" if self.status == AckStatus.REJECTED else "").signed(self.key)
        self.link.publish(ack_topic(device), encode(ack))

    def __enter__(self):
        self.link.start()
        assert self.link.wait_connected(10)
        return self

    def __exit__(self, *exc):
        self.link.close()


def enqueue(outbox, device_key, device_id, n, size=20_000):
    ids = []
    for _ in range(n):
        def build(seq):
            env = seal({"dicom": bytes([seq % 256]) * size}, device_id=device_id, sequence=seq,
                       signer=device_key, recipient=CUSTODIAN.public, created_ms=seq)
            ids.append(env.envelope_id)
            return Sealed(env.envelope_id, encode(env), env.header.digest())
        outbox.enqueue(build)
    return ids


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("size", [20_000, 300_000], ids=["whole", "fragmented"])
def test_everything_is_delivered_and_released(tmp_path, broker_endpoint, size, new_device_id):
    import dataclasses

    endpoint = dataclasses.replace(broker_endpoint, max_message_bytes=64 * 1024)
    device, cloud = SigningKey.generate(), SigningKey.generate()
    device_id = new_device_id()
    with Outbox(tmp_path / "o.db") as box, CloudPeer(endpoint, cloud, device.public) as peer:
        ids = enqueue(box, device, device_id, 12, size)
        with Uplink(box, endpoint, device_id=device_id, device_key=device,
                    cloud_key=cloud.public, settings=FAST) as up:
            assert up.wait_drained(30), f"outbox still holds {box.depth}: {up.stats}"
        assert set(peer.received) == set(ids)
        assert up.stats.released == 12 and up.stats.bad_acks == 0
        one = peer.received[ids[3]]
        assert open_envelope(one, CUSTODIAN, device.public)["dicom"] == bytes([4]) * size


def test_acks_not_signed_by_the_cloud_release_nothing(tmp_path, broker_endpoint, new_device_id):
    device, cloud, impostor = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    device_id = new_device_id()
    with Outbox(tmp_path / "o.db") as box, CloudPeer(broker_endpoint, impostor, device.public) as peer:
        enqueue(box, device, device_id, 3)
        with Uplink(box, broker_endpoint, device_id=device_id, device_key=device,
                    cloud_key=cloud.public, settings=FAST) as up:
            assert wait_for(lambda: up.stats.bad_acks >= 3)
        assert box.depth == 3 and up.stats.released == 0 and len(peer.received) == 3


def test_a_cloud_signed_ack_for_another_header_releases_nothing(tmp_path, broker_endpoint, new_device_id):
    """An ack names the envelope id and the hash of the header the device signed: one for
    the same id over another header (what ingest would have signed for a forged copy) is
    ignored and counted. Before acks carried the header hash, such a ``rejected`` ack made
    the edge set its genuine envelope aside for good."""
    device, cloud = SigningKey.generate(), SigningKey.generate()
    device_id = new_device_id()
    with Outbox(tmp_path / "o.db") as box, CloudPeer(broker_endpoint, cloud, device.public,
                                                     status=AckStatus.REJECTED, header_hash=b"\x07" * 32):
        enqueue(box, device, device_id, 3)
        with Uplink(box, broker_endpoint, device_id=device_id, device_key=device,
                    cloud_key=cloud.public, settings=FAST) as up:
            assert wait_for(lambda: up.stats.unmatched_acks >= 3)
        assert box.depth == 3 and box.rejected() == [] and up.stats.released == 0


def test_rejections_are_set_aside_with_their_reason(tmp_path, broker_endpoint, new_device_id):
    device, cloud = SigningKey.generate(), SigningKey.generate()
    device_id = new_device_id()
    with Outbox(tmp_path / "o.db") as box, \
            CloudPeer(broker_endpoint, cloud, device.public, status=AckStatus.REJECTED):
        ids = enqueue(box, device, device_id, 2)
        with Uplink(box, broker_endpoint, device_id=device_id, device_key=device,
                    cloud_key=cloud.public, settings=FAST) as up:
            assert up.wait_drained(20)
        assert box.rejected() == [(ids[0], "refused by test"), (ids[1], "refused by test")]


def test_heartbeat_is_retained_and_signed(tmp_path, broker_endpoint, new_device_id):
    device, cloud = SigningKey.generate(), SigningKey.generate()
    device_id = new_device_id()
    with Outbox(tmp_path / "o.db") as box:
        enqueue(box, device, device_id, 2)
        with Uplink(box, broker_endpoint, device_id=device_id, device_key=device,
                    cloud_key=cloud.public, settings=FAST, model_version=lambda: "m-1") as up:
            assert wait_for(lambda: up.stats.heartbeats >= 1)
        beats: queue.Queue = queue.Queue()
        late = MqttLink(broker_endpoint, subscriptions=[(heartbeat_topic(device_id), 1)],
                        on_message=lambda t, p: beats.put(p), persistent_session=False)
        with late:  # subscribes after the device left: the retained beat is still there
            beat = decode_message(beats.get(timeout=10), expect=Heartbeat)
        beat.verify(device.public)
        assert (beat.device_id, beat.queue_depth, beat.model_version) == (device_id, 2, "m-1")
        assert beat.disk_free_bytes > 0


def test_broker_stopped_and_restarted_mid_stream(tmp_path, private_mosquitto, new_device_id):
    endpoint = private_mosquitto.endpoint
    device, cloud = SigningKey.generate(), SigningKey.generate()
    device_id = new_device_id()
    with Outbox(tmp_path / "o.db") as box:
        ids = enqueue(box, device, device_id, 10)
        with CloudPeer(endpoint, cloud, device.public) as peer, \
                Uplink(box, endpoint, device_id=device_id, device_key=device,
                       cloud_key=cloud.public, settings=FAST) as up:
            assert wait_for(lambda: up.stats.released >= 1)
            private_mosquitto.stop()  # the broker vanishes mid-stream
            ids += enqueue(box, device, device_id, 10)  # the scanner keeps sending meanwhile
            time.sleep(1.0)
            assert box.depth >= 10  # nothing is dropped while it is away
            private_mosquitto.start()
            assert up.wait_drained(40), f"outbox still holds {box.depth}: {up.stats}"
            assert up.link.connects >= 2
        assert set(peer.received) == set(ids)  # every envelope arrived; repeats were acked again


def test_cloud_monitor_records_verified_heartbeats(tmp_path, deployment, new_device_id):
    from cloud.fleet import FleetRegistry
    from cloud.monitor import HeartbeatMonitor

    broker, database_url = deployment
    device, cloud = SigningKey.generate(), SigningKey.generate()
    device_id = new_device_id()
    device_endpoint = broker.endpoint_for(broker.admit(device_id))
    fleet = FleetRegistry(database_url or f"sqlite:///{tmp_path / 'fleet.db'}")
    fleet.enrol(device_id, device.public, site="s", group="g", profile="x86-cpu", now_ms=0)
    with HeartbeatMonitor(broker.coordinator_endpoint, fleet) as monitor, Outbox(tmp_path / "o.db") as box:
        enqueue(box, device, device_id, 1)
        with Uplink(box, device_endpoint, device_id=device_id, device_key=device,
                    cloud_key=cloud.public, settings=FAST, model_version=lambda: "m-7"):
            assert wait_for(lambda: monitor.stats.recorded >= 1)
        got = fleet.get(device_id)
        assert (got.model_version, got.queue_depth) == ("m-7", 1) and got.last_seen_ms > 0
