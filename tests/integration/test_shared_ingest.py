"""Cloud ingest sharing one MQTT shared subscription, on the real Mosquitto (127.0.0.1:1883).

Two coordinators (each with two ingest worker threads) join the same ``$share`` group and
share one catalog (PostgreSQL) and one object store, as scaled-out ingest would. Studies from
two edges must each be stored exactly once and acknowledged, with both services taking part;
the same envelope reaching two workers at once (the edge resending after its timeout) is
stored once and acknowledged twice; and a service that leaves the group takes no share of
the traffic with it.
"""

import dataclasses
import queue
import time
import uuid

import pytest

from medchain.mqtt import MqttEndpoint, MqttLink
from medchain.protocol import Ack, AckStatus, ack_topic, decode_message, encode, envelope_topic
from medchain.identity import RecipientKey
from medchain.sealing import seal

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto, pytest.mark.postgres]


@pytest.fixture
def ingest_group(mosquitto, postgres_schema_url, site_on, tmp_path):
    """``ingest_group(n)``: n sites whose coordinators form one shared-subscription group
    (2 workers each) over one catalog and one object store; each site has its own edge."""
    endpoint = MqttEndpoint(host=mosquitto.host, port=mosquitto.port, max_message_bytes=8 * 1024 * 1024,
                            reconnect_min_s=0.2, reconnect_max_s=1.0)
    group = f"medchain-test-{uuid.uuid4().hex[:8]}"
    meta_key = tmp_path / "shared-meta.key"  # one ingest service scaled out: one metadata key
    RecipientKey.generate().save(meta_key)
    cloud = {"broker": {"shared_group": group, "workers": 2},
             "database": {"url": postgres_schema_url},
             "store": {"url": str(tmp_path / "shared-objects")},
             "keys": {"meta": str(meta_key)}}

    def make(n: int):
        sites = [site_on(endpoint, cloud=cloud) for _ in range(n)]
        for site in sites:
            assert site.config.shared_group == group and site.config.workers == 2
            site.enroll()
        return sites

    return make


def start_group(sites, wait_for) -> list:
    for site in sites:
        site.coordinator.start()
    services = [site.coordinator.ingest for site in sites]
    assert wait_for(lambda: all(s.link.connected for s in services), 20)
    assert len({s.link.client_id for s in services}) == len(services), "members need their own ids"
    time.sleep(0.5)  # SUBACK: every member is in the group before anything is sent
    return services


def ours(stats, device_ids) -> dict:
    """Rejections of our devices (the shared broker also carries other tests' traffic, which
    our group refuses as coming from unknown devices)."""
    return {r: n for r, n in stats.reasons.items() if any(d in r for d in device_ids)}


def test_two_ingest_services_share_the_load_and_store_each_envelope_once(ingest_group, wait_for):
    a, b = ingest_group(2)
    services = start_group([a, b], wait_for)
    for site in (a, b):
        site.start_edge()
    _, sent_a = a.send("CT", studies=2, seed=41, per_study=3)
    _, sent_b = b.send("MR", studies=2, seed=42, per_study=3)
    assert sent_a.success == 6 and sent_b.success == 6
    assert a.settled() and b.settled(), (a.agent.stats(), b.agent.stats())

    store, catalog = a.coordinator.store, a.coordinator.catalog  # the same for both sites
    ids = set(store.ids())
    assert len(ids) == 12 and catalog.count() == 12 and set(b.coordinator.store.ids()) == ids
    for site in (a, b):
        entries = catalog.entries(device_id=site.device_id)
        assert len(entries) == 6 and len({e.sequence for e in entries}) == 6
        assert {e.envelope_id for e in entries} <= ids
        up = site.agent.uplink.stats  # counted just after the outbox drops the envelope
        assert wait_for(lambda: up.released == 6, 10) and up.rejected == 0, up
        for e in entries:  # registered on the ledger, at the place the catalog says
            proof = a.coordinator.ledger.image(bytes.fromhex(e.envelope_id))
            assert proof.header.height == e.receipt.ledger_height
    per_service = [s.stats.stored for s in services]
    assert sum(per_service) == 12, per_service
    assert all(n >= 1 for n in per_service), f"a service took no part: {per_service}"
    for s in services:
        assert s.stats.failed == 0 and not ours(s.stats, [a.device_id, b.device_id]), s.stats
        assert len(s._threads) == 2
    print(f"\nstored per ingest service: {per_service}; duplicates: {[s.stats.duplicates for s in services]}")


def test_the_same_envelope_reaching_two_workers_at_once_is_stored_once_and_acked_twice(
        ingest_group, wait_for):
    a, b = ingest_group(2)
    services = start_group([a, b], wait_for)
    acks: queue.Queue[Ack] = queue.Queue()
    with MqttLink(a.endpoint, subscriptions=[(ack_topic(a.device_id), 1)], persistent_session=False,
                  on_message=lambda t, p: acks.put(decode_message(p, expect=Ack))) as edge:
        assert edge.wait_connected(10)
        time.sleep(0.3)
        for sequence in range(3):
            env = seal({"dicom": bytes([sequence]) * 50_000}, device_id=a.device_id, sequence=sequence,
                       signer=a.device_key, recipient=a.coordinator.custodian_public,
                       created_ms=sequence, meta={"modality": "CT"},
                       meta_recipient=a.coordinator.meta_key.public)
            data = encode(env)
            for _ in range(2):  # sent, and sent again at once, as a resend after a timeout
                edge.publish(envelope_topic(a.device_id), data)
            got = [acks.get(timeout=30), acks.get(timeout=30)]
            for ack in got:
                ack.verify(a.coordinator.ingest_key.public)
                assert ack.envelope_id == env.envelope_id and ack.releases
            assert sorted(ack.status for ack in got) == [AckStatus.DUPLICATE, AckStatus.STORED]
            assert len({(ack.ledger_height, ack.tx_index) for ack in got}) == 1, "one ledger record"
            assert a.coordinator.catalog.get(env.envelope_id) is not None
    assert sorted(a.coordinator.store.ids()) == sorted(e.envelope_id for e in a.coordinator.catalog.entries())
    assert a.coordinator.catalog.count() == 3
    assert sum(s.stats.stored for s in services) == 3
    assert sum(s.stats.duplicates for s in services) == 3
    assert all(s.stats.failed == 0 for s in services)


def test_an_edge_resending_before_the_ack_gets_each_envelope_stored_once(ingest_group, wait_for):
    a, b = ingest_group(2)
    services = start_group([a, b], wait_for)
    # resend long before a ledger commit can come back: every envelope travels several times
    a.profile = dataclasses.replace(a.profile, uplink=dataclasses.replace(a.profile.uplink, resend_after_s=0.02))
    agent = a.start_edge()
    _, sent = a.send("CT", studies=2, seed=43, per_study=3)
    assert sent.success == 6
    assert a.settled(), agent.stats()
    assert agent.uplink.stats.republished >= 1, agent.uplink.stats
    # the outbox drops an envelope just before the uplink counts it, and a service counts
    # what it stored after the ack left: let the counters catch up
    assert wait_for(lambda: agent.uplink.stats.released == 6, 10), agent.uplink.stats
    assert a.coordinator.catalog.count() == 6 and len(list(a.coordinator.store.ids())) == 6
    assert wait_for(lambda: sum(s.stats.stored for s in services) == 6, 10), [s.stats for s in services]
    assert sum(s.stats.duplicates for s in services) >= 1
    assert all(s.stats.failed == 0 and not ours(s.stats, [a.device_id]) for s in services)
    print(f"\nrepublished {agent.uplink.stats.republished}; stored {[s.stats.stored for s in services]}, "
          f"duplicates {[s.stats.duplicates for s in services]}")


def test_a_service_that_leaves_the_group_takes_no_share_of_the_traffic(ingest_group, wait_for):
    a, b = ingest_group(2)
    start_group([a, b], wait_for)
    b.coordinator.stop()
    # no resend within the test: only the remaining member can deliver in time
    a.profile = dataclasses.replace(a.profile, uplink=dataclasses.replace(a.profile.uplink, resend_after_s=120))
    agent = a.start_edge()
    _, sent = a.send("CT", studies=2, seed=44, per_study=2)
    assert sent.success == 4
    assert a.settled(timeout=30), agent.stats()
    assert agent.uplink.stats.republished == 0
    assert a.coordinator.ingest.stats.stored == 4 and a.coordinator.catalog.count() == 4


def test_fragmented_envelopes_complete_in_a_group_without_waiting_for_a_resend(ingest_group, wait_for):
    a, b = ingest_group(2)
    start_group([a, b], wait_for)
    a.edge_endpoint = dataclasses.replace(a.endpoint, max_message_bytes=64 * 1024)
    a.profile = dataclasses.replace(a.profile, uplink=dataclasses.replace(a.profile.uplink, resend_after_s=120))
    agent = a.start_edge()
    _, sent = a.send("CT", studies=1, seed=45, per_study=2)
    assert sent.success == 2
    assert a.settled(timeout=20), agent.stats()
