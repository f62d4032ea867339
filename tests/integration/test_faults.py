"""Faults on the path scanner -> edge -> broker -> cloud -> ledger. Each either loses and
duplicates nothing (the store ends with exactly the instances that got DICOM Success) or is
refused with a reason and leaves nothing stored."""

import dataclasses
import queue

import pytest

from medchain.mqtt import MqttLink
from medchain.protocol import Ack, AckStatus, Envelope, ack_topic, decode_message, encode, envelope_topic
from medchain.sealing import open_meta, seal

pytestmark = pytest.mark.slow


class Peer:
    """Someone else on the broker: publishes on a device's topic, listens to its acks."""

    def __init__(self, endpoint, device_id):
        self.device_id, self.acks = device_id, queue.Queue()
        self.link = MqttLink(endpoint, subscriptions=[(ack_topic(device_id), 1)], persistent_session=False,
                             on_message=lambda t, p: self.acks.put(decode_message(p, expect=Ack)))

    def __enter__(self):
        self.link.start()
        assert self.link.wait_connected(10)
        return self

    def __exit__(self, *exc):
        self.link.close()

    def publish(self, data: bytes, timeout: float = 30) -> Ack | None:
        """Publish; the ack that came back, or None if none came within ``timeout``."""
        self.link.publish(envelope_topic(self.device_id), data)
        try:
            return self.acks.get(timeout=timeout)
        except queue.Empty:
            return None


def stored_envelopes(site) -> list[Envelope]:
    return [site.coordinator.store.get(i) for i in site.coordinator.store.ids()]


def test_unknown_device_is_ignored_and_nothing_is_stored(make_site, wait_for):
    """An unknown device gets no answer at all (an answer signed by the cloud for something
    nobody can vouch for is what let a forger make a device give up its envelopes); its edge
    keeps the envelopes, and nothing is stored."""
    site = make_site()  # never enrolled; the edge holds a forged enrolment file
    if site.broker is not None:
        site.admit()  # and the broker lets it in (an ACL not re-written since): ingest must refuse it
    from cloud.enrolment import write_enrollment
    from medchain.protocol import Enrollment

    c = site.coordinator
    write_enrollment(Enrollment(site.device_id, site.device_key.public.raw, c.ingest_key.public.raw,
                                c.custodian_public.raw, c.meta_key.public.raw, c.ingest_key.public.raw, 0), site.profile.cloud.enrollment)
    with site.coordinator:
        site.start_edge()
        _, result = site.send("MR", studies=1, seed=21, per_study=2)
        assert result.success == 2
        assert wait_for(lambda: site.agent.outbox.depth == 2 and c.ingest.stats.unauthenticated >= 2)
        assert site.agent.outbox.rejected() == []  # kept, to be sent again once enrolled
        assert list(c.store.ids()) == [] and c.catalog.count() == 0


def test_revoked_device_is_rejected_after_revocation(make_site, wait_for):
    from cloud.enrolment import revoke

    site = make_site()
    site.enroll()
    with site.coordinator:
        site.start_edge()
        _, before = site.send("CR", studies=1, seed=22, per_study=2)
        assert site.settled() and len(stored_envelopes(site)) == before.success == 2
        revoke(site.config, site.coordinator.fleet, site.device_id, "stolen from the ward")
        site.coordinator.ingest.directory.forget(site.device_id)  # other processes: within 2 s
        _, after = site.send("CR", studies=1, seed=23, per_study=2)
        assert after.success == 2
        assert wait_for(lambda: len(site.agent.outbox.rejected()) == 2)
        assert {r for _, r in site.agent.outbox.rejected()} == {f"device {site.device_id!r} is revoked"}
        assert len(stored_envelopes(site)) == 2  # nothing after the revocation


def test_tampered_chunk_and_replay_from_another_client(make_site):
    """A tampered or forged envelope gets no answer, so nobody can make a device give up an
    envelope by publishing a bad copy under its id. Before this change (c1ffc7f) both got a
    signed ``rejected`` ack under the envelope id the publisher chose, which the device
    obeyed: its outbox moved that id to rejected and never sent it again."""
    site = make_site()
    site.enroll()
    with site.coordinator:
        site.start_edge()
        _, result = site.send("DX", studies=1, seed=24, per_study=1)
        assert site.settled() and result.success == 1
        (original,) = stored_envelopes(site)
        with Peer(site.insider(), site.device_id) as peer:
            replay = peer.publish(encode(original))
            assert replay.status == AckStatus.DUPLICATE and replay.envelope_id == original.envelope_id
            bodies = list(original.bodies)
            bodies[0] = bytes([bodies[0][0] ^ 1]) + bodies[0][1:]
            tampered = dataclasses.replace(original, bodies=tuple(bodies))
            assert peer.publish(encode(tampered), timeout=3) is None
            forged = seal({"dicom": b"not from the device"}, device_id=site.device_id, sequence=999,
                          signer=type(site.device_key).generate(), recipient=site.coordinator.custodian_public,
                          created_ms=0)
            forged = dataclasses.replace(forged, header=dataclasses.replace(
                forged.header, object_id=original.header.object_id))  # under the genuine id
            assert peer.publish(encode(forged), timeout=3) is None
        reasons = site.coordinator.ingest.stats.reasons
        assert any("chunk 0 does not match its digest" in r for r in reasons)
        assert any("signature" in r for r in reasons)
        assert site.coordinator.ingest.stats.unauthenticated == 2
        assert [e.envelope_id for e in stored_envelopes(site)] == [original.envelope_id]
        assert site.coordinator.catalog.count() == 1


# -- crashes and outages: nothing lost, nothing duplicated --------------------------------------

import sqlite3  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

from cloud.broker import free_port  # noqa: E402
from scanner_sim.sender import items_from_datasets, send  # noqa: E402
from scanner_sim.studies import generate_studies  # noqa: E402


def outbox_depth(site) -> int:
    path = site.profile.outbox.path
    if not path.exists():
        return 0
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return db.execute("select count(*) from outbox").fetchone()[0]


def send_to(port: int, modality: str, studies: int, seed: int, per_study: int = 2):
    sims = generate_studies(modality, studies, seed=seed, images_per_study=per_study)
    items = items_from_datasets([ds for st in sims for ds in st.datasets])
    return send("127.0.0.1", port, items, calling_ae=f"SCANNER_{modality}", called_ae="MEDCHAIN_EDGE",
                concurrency=2, progress=False)


def assert_exactly_once(site, expected: int) -> None:
    """The store holds ``expected`` envelopes, one per instance, each catalogued once."""
    envs = stored_envelopes(site)
    key = site.coordinator.meta_key
    per_instance = Counter(open_meta(e.header, key)["sop_instance_uid"] for e in envs)
    assert len(envs) == expected and set(per_instance.values()) <= {1}, per_instance
    assert site.coordinator.catalog.count() == expected


def test_edge_killed_with_a_full_outbox_then_restarted(make_site, wait_for):
    site = make_site()
    site.enroll()
    port = free_port()
    edge = site.spawn_edge(port)  # the cloud is not running: everything waits in the outbox
    result = send_to(port, "CT", studies=2, seed=31, per_study=3)
    assert result.success == 6, result.summary()
    assert wait_for(lambda: outbox_depth(site) == 6)
    edge.kill()  # SIGKILL: no clean shutdown
    edge.wait(10)
    site.spawn_edge(port)
    with site.coordinator:
        assert wait_for(lambda: site.coordinator.catalog.count() == 6 and outbox_depth(site) == 0, 90)
        assert_exactly_once(site, result.success)


def test_cloud_killed_mid_stream_then_restarted(make_site, wait_for):
    site = make_site()
    site.enroll()
    cloud = site.spawn_cloud()
    site.start_edge()
    results = []
    sender = threading.Thread(target=lambda: results.append(
        send_to(site.agent.node.port, "MR", studies=4, seed=32, per_study=3)))
    sender.start()
    assert wait_for(lambda: site.coordinator.catalog.count() >= 2)
    cloud.kill()  # SIGKILL mid-stream: whatever it held unacknowledged is resent
    cloud.wait(10)
    time.sleep(1.0)
    site.spawn_cloud()
    sender.join(120)
    (result,) = results
    assert result.success == 12, result.summary()
    assert site.settled(120), site.agent.stats()
    assert_exactly_once(site, result.success)


def test_broker_stopped_and_restarted_mid_stream(site_on, private_mosquitto, wait_for):
    site = site_on(private_mosquitto.endpoint)
    site.enroll()
    with site.coordinator:
        site.start_edge()
        results = []
        sender = threading.Thread(target=lambda: results.append(
            send_to(site.agent.node.port, "CR", studies=4, seed=33, per_study=3)))
        sender.start()
        assert wait_for(lambda: site.coordinator.catalog.count() >= 2)
        private_mosquitto.stop()  # the broker vanishes; the scanner keeps sending
        sender.join(120)
        time.sleep(1.0)
        private_mosquitto.start()
        (result,) = results
        assert result.success == 12, result.summary()
        assert site.settled(120), site.agent.stats()
        assert_exactly_once(site, result.success)


@pytest.fixture
def small_edge_disk(tmp_path, small_tmpfs):
    """The first site's edge directory on a real 24 MiB filesystem."""
    return small_tmpfs(tmp_path / "site0" / "edge", 24)


def test_full_edge_disk_is_back_pressure_and_loses_nothing(small_edge_disk, make_site, wait_for):
    site = make_site()
    assert site.edge_dir == small_edge_disk
    site.enroll()
    site.profile = dataclasses.replace(site.profile, outbox=dataclasses.replace(
        site.profile.outbox, min_disk_free_bytes=3 * 1024**2))
    site.start_edge()  # the cloud is down: the disk fills up with spooled and queued objects
    result = send_to(site.agent.node.port, "CT", studies=12, seed=34, per_study=4)  # 48 x 0.5 MiB
    assert 0 < result.success < 48, result.summary()
    assert result.statuses.get(0xA700, 0) > 0, result.summary()  # Out of Resources, not a loss
    assert site.agent.node.drain(30)
    with site.coordinator:
        assert site.settled(120), site.agent.stats()
        assert_exactly_once(site, result.success)
