"""MQTT over TLS with client certificates, against a real Mosquitto whose only listener is
TLS and requires a certificate signed by the site's CA (``tls_mosquitto``).

A whole site runs over it (edge agent and coordinator each with their own certificate, a
real 4-validator ledger); a client without a certificate, or with one from another CA, is
refused with an error that says so and the edge keeps every envelope until it is given the
right certificate; and an operator's ``mosquitto_sub`` sees the devices' retained heartbeats.
"""

import dataclasses
import logging
import shutil
import subprocess
import time

import pytest

from edge_agent.outbox import Outbox
from edge_agent.service import endpoint_of
from medchain.mqtt import LinkError, MqttLink
from medchain.protocol import Heartbeat, decode_message, heartbeat_topic

pytestmark = pytest.mark.slow

NO_CERTIFICATE = "requires a client certificate and none was presented"
OTHER_CA = "not signed by a CA the broker trusts"


def install_edge_tls(site, broker, identity) -> object:
    """Put the CA and ``identity`` where the bundled x86-cpu profile's ``[mqtt.tls]`` expects
    them (``keys/ca.pem``, ``keys/device.crt``, ``keys/device-tls.key``), point the profile at
    ``broker`` and return the endpoint the edge agent derives from it. ``identity=None``: an
    edge that trusts the CA but has no certificate of its own."""
    keys = site.edge_dir / "keys"
    shutil.copyfile(broker.pki.ca, keys / "ca.pem")
    tls = site.profile.mqtt.tls
    assert (tls.ca, tls.cert, tls.key) == (keys / "ca.pem", keys / "device.crt", keys / "device-tls.key")
    if identity is not None:
        shutil.copyfile(identity.cert, tls.cert)
        shutil.copyfile(identity.key, tls.key)
        tls.key.chmod(0o600)
    mqtt = dataclasses.replace(site.profile.mqtt, host="127.0.0.1", port=broker.port)
    endpoint = dataclasses.replace(endpoint_of(dataclasses.replace(site.profile, mqtt=mqtt)),
                                   reconnect_min_s=0.2, reconnect_max_s=1.0)
    if identity is None:
        endpoint = dataclasses.replace(endpoint, tls_cert=None, tls_key=None)
    return endpoint


@pytest.fixture
def tls_site(tls_mosquitto, site_on):
    """``tls_site(edge_identity)``: a site whose cloud uses the ``cloud`` certificate (through
    ``[broker.tls]``) and whose edge presents ``edge_identity``."""

    def make(edge_identity):
        broker = tls_mosquitto
        cloud = broker.endpoint_as(broker.pki.clients["cloud"])
        site = site_on(cloud)
        assert (site.config.endpoint.tls_ca, site.config.endpoint.tls_cert, site.config.endpoint.tls_key) \
            == (cloud.tls_ca, cloud.tls_cert, cloud.tls_key)
        site.edge_endpoint = install_edge_tls(site, broker, edge_identity)
        return site

    return make


def assert_stored_once(site, count: int) -> None:
    store, catalog, ledger = site.coordinator.store, site.coordinator.catalog, site.coordinator.ledger
    ids = sorted(store.ids())
    assert len(ids) == count and catalog.count() == count
    sops = set()
    for envelope_id in ids:
        env = store.get(envelope_id)
        sops.add(catalog.get(envelope_id).meta["sop_instance_uid"])  # as ingest opened it
        proof = ledger.image(env.header.object_id)
        assert proof.record["merkle_root"] == env.header.merkle_root
        assert catalog.get(envelope_id).receipt.ledger_height == proof.header.height
    assert len(sops) == count
    stats = site.coordinator.ingest.stats
    assert (stats.stored, stats.rejected, stats.malformed, stats.failed) == (count, 0, 0, 0), stats


def test_a_site_over_tls_with_client_certificates_stores_every_study_once(tls_site, tls_mosquitto,
                                                                            wait_for):
    site = tls_site(tls_mosquitto.pki.clients["edge"])
    # small messages: envelopes travel as fragments, many TLS records each
    site.edge_endpoint = dataclasses.replace(site.edge_endpoint, max_message_bytes=64 * 1024)
    site.enroll()
    with site.coordinator:
        agent = site.start_edge()
        assert agent.uplink.link.endpoint.tls_cert.endswith("device.crt")
        sims, result = site.send("CT", studies=2, seed=21, per_study=2)
        assert result.success == 4, result.summary()
        sims, result = site.send("US", studies=1, seed=22, per_study=1)  # cine, multi-frame
        assert result.success == 1, result.summary()
        assert site.settled(), agent.stats()
        assert_stored_once(site, 5)
        # the outbox drops an envelope just before the uplink counts it released
        assert wait_for(lambda: agent.uplink.stats.released == 5, 10), agent.uplink.stats
        assert agent.uplink.stats.bad_acks == 0
        assert agent.uplink.link.connects >= 1 and site.coordinator.ingest.link.connects >= 1


@pytest.mark.parametrize("who, words", [(None, NO_CERTIFICATE), ("rogue", OTHER_CA)],
                         ids=["no-certificate", "certificate-from-another-ca"])
def test_an_edge_without_a_valid_certificate_is_refused_and_keeps_its_envelopes(
        tls_site, tls_mosquitto, wait_for, caplog, who, words):
    pki = tls_mosquitto.pki
    site = tls_site(pki.rogue_client if who == "rogue" else None)
    site.enroll()
    with site.coordinator, caplog.at_level(logging.WARNING, logger="medchain.mqtt"):
        agent = site.start_edge()
        link = agent.uplink.link
        sims, result = site.send("CT", studies=1, seed=31, per_study=3)
        assert result.success == 3, result.summary()  # the scanner is served regardless
        assert wait_for(lambda: agent.outbox.depth == 3 and link.last_error, 30), (agent.stats(), link.last_error)
        time.sleep(2.5)  # several more attempts, each refused
        assert not link.connected and link.connects == 0
        assert words in link.last_error and "TLS" in link.last_error
        with pytest.raises(LinkError, match="TLS handshake") as refused:
            link.publish("medchain/v1/probe", b"x")
        assert words in str(refused.value)
        warnings = [r for r in caplog.records
                    if words in r.getMessage() and link.client_id in r.getMessage()]
        assert len(warnings) == 1, "the reason is logged once per link, not on every retry"
        # nothing reached the cloud, nothing left the edge
        assert agent.outbox.depth == 3
        assert list(site.coordinator.store.ids()) == [] and site.coordinator.catalog.count() == 0

        # the operator installs the device's real certificate: the same outbox drains
        site.stop_edge()
        with Outbox(site.profile.outbox.path) as kept:  # what the restarted agent will find
            assert kept.depth == 3
        site.edge_endpoint = install_edge_tls(site, tls_mosquitto, pki.clients["edge"])
        agent = site.start_edge()
        assert site.settled(), agent.stats()
        assert_stored_once(site, 3)
        assert agent.uplink.link.last_error == ""


REASONS = {
    "no-certificate": NO_CERTIFICATE,
    "certificate-from-another-ca": OTHER_CA,
    "broker-not-trusted": "the broker's certificate is not trusted by our CA file",
    "plain-mqtt": "the broker closed the connection before accepting it",
}


@pytest.mark.parametrize("case", list(REASONS))
def test_every_refusal_says_why(tls_mosquitto, wait_for, case):
    words = REASONS[case]
    broker, pki = tls_mosquitto, tls_mosquitto.pki
    endpoint = {
        "no-certificate": broker.endpoint,
        "certificate-from-another-ca": broker.endpoint_as(pki.rogue_client),
        "broker-not-trusted": broker.endpoint_as(pki.clients["probe"], ca=pki.rogue_ca),
        "plain-mqtt": dataclasses.replace(broker.endpoint, tls_ca=None),
    }[case]
    with MqttLink(endpoint, persistent_session=False) as link:
        assert wait_for(lambda: link.last_error, 15), "no reason recorded"
        assert not link.connected
        with pytest.raises(LinkError) as refused:
            link.publish("medchain/v1/probe", b"x")
    assert words in str(refused.value) and endpoint.describe() in str(refused.value)
    # the same broker takes a client with a certificate from the site's CA
    with MqttLink(broker.endpoint_as(pki.clients["probe"]), persistent_session=False) as good:
        assert good.wait_connected(10) and good.last_error == ""


def test_heartbeats_are_retained_and_visible_to_mosquitto_sub_over_tls(
        tls_site, tls_mosquitto, mosquitto_sub, wait_for):
    pki = tls_mosquitto.pki
    site = tls_site(pki.clients["edge"])
    site.enroll()
    with site.coordinator:
        agent = site.start_edge()
        assert wait_for(lambda: agent.uplink.stats.heartbeats >= 2, 30), agent.uplink.stats
        assert wait_for(lambda: site.coordinator.monitor.stats.recorded >= 1, 15)
        site.stop_edge()  # retained: the last beat stays readable while the device is away

        topic = heartbeat_topic(site.device_id)
        tls = ["-h", "127.0.0.1", "-p", str(tls_mosquitto.port), "--cafile", str(pki.ca)]
        probe = pki.clients["probe"]
        out = subprocess.run(
            [mosquitto_sub, *tls, "--cert", str(probe.cert), "--key", str(probe.key), "-t", topic,
             "--retained-only", "-C", "1", "-W", "15", "-F", "%r %t %x"],
            capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        retained, got_topic, payload = out.stdout.split()
        assert (retained, got_topic) == ("1", topic)
        beat = decode_message(bytes.fromhex(payload), expect=Heartbeat)
        beat.verify(site.device_key.public)
        assert beat.device_id == site.device_id and beat.queue_depth == 0

        refused = subprocess.run([mosquitto_sub, *tls, "-t", topic, "-C", "1", "-W", "5"],
                                 capture_output=True, text=True, timeout=30)
        assert refused.returncode != 0 and refused.stdout == ""
