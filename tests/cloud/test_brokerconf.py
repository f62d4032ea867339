"""The generated Mosquitto set-up, checked as an operator would: with ``mosquitto_pub`` and
``mosquitto_sub`` holding a device's certificate, a real Mosquitto lets each device use its
own topics and nothing else, refuses anonymous clients, and gives a certificate for a name
the registry does not hold no topic at all."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from cloud.broker import BrokerSecurity, EmbeddedBroker, free_port
from cloud.brokerconf import acl_text, write_broker_files
from medchain.pki import CertificateAuthority
from medchain.protocol import ack_topic, envelope_topic, model_offer_topic

COORDINATOR = "cloud-coordinator"


@pytest.fixture(params=["mosquitto", "embedded"])
def acl_broker(request, tmp_path, need_tools):
    """The same deployment files served by a real Mosquitto and by the embedded broker."""
    need_tools("mosquitto", "mosquitto_pub", "mosquitto_sub")
    ca = CertificateAuthority.create(tmp_path / "ca", "Hospital A")
    server = ca.issue("broker", tmp_path / "broker", server=True, client=False, hosts=("127.0.0.1",))
    ids = {cn: ca.issue(cn, tmp_path / cn) for cn in ("edge-a", "edge-b", COORDINATOR, "stranger")}
    ids["rogue"] = CertificateAuthority.create(tmp_path / "rogue", "Not the hospital").issue("edge-a", tmp_path / "rogue")
    port = free_port()
    files = write_broker_files(tmp_path / "mosquitto", host="127.0.0.1", port=port, ca=ca.cert_path,
                               cert=server.cert, key=server.key, crl=ca.crl_path,
                               devices=["edge-a", "edge-b"], coordinator=COORDINATOR,
                               as_root=os.geteuid() == 0)
    broker = Broker(port, ca.cert_path, ids)
    if request.param == "embedded":
        security = BrokerSecurity(ca.cert_path, server.cert, server.key, ca.crl_path, files.acl)
        with EmbeddedBroker(port=port, security=security):
            yield broker
        return
    proc = subprocess.Popen(["mosquitto", "-c", str(files.conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while broker.pub(COORDINATOR, "medchain/v1/models/probe", "x").returncode != 0:
            assert time.monotonic() < deadline and proc.poll() is None, "broker did not come up"
            time.sleep(0.1)
        yield broker
    finally:
        proc.terminate()
        proc.wait(10)


class Broker:
    def __init__(self, port: int, ca: Path, ids) -> None:
        self.port, self.ca, self.ids = port, ca, ids

    def _auth(self, who: str | None) -> list[str]:
        base = ["-h", "127.0.0.1", "-p", str(self.port), "--cafile", str(self.ca)]
        if who is None:
            return base
        return base + ["--cert", str(self.ids[who].cert), "--key", str(self.ids[who].key)]

    def pub(self, who: str | None, topic: str, message: str, retain: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(["mosquitto_pub", *self._auth(who), "-q", "1", "-t", topic, "-m", message]
                              + (["-r"] if retain else []), capture_output=True, text=True, timeout=20)

    def sub(self, who: str, topic: str) -> subprocess.Popen:
        """A subscriber that prints the first message (or nothing within 3 s)."""
        proc = subprocess.Popen(["mosquitto_sub", *self._auth(who), "-q", "1", "-t", topic, "-C", "1",
                                 "-W", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)  # subscribed before anything is sent
        return proc


def _got(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=20)
    return out.strip()


def test_a_device_uses_its_own_topics_and_nothing_else(acl_broker):
    b = acl_broker
    watcher = b.sub(COORDINATOR, envelope_topic("+"))
    assert b.pub("edge-a", envelope_topic("edge-a"), "mine").returncode == 0
    assert _got(watcher) == "mine"
    watcher = b.sub(COORDINATOR, envelope_topic("+"))
    b.pub("edge-a", envelope_topic("edge-b"), "forged")  # accepted on the wire, dropped by the ACL
    assert _got(watcher) == ""
    spy = b.sub("edge-a", ack_topic("edge-b"))  # edge-a tries to read edge-b's acks
    own = b.sub("edge-b", ack_topic("edge-b"))
    assert b.pub(COORDINATOR, ack_topic("edge-b"), "ack").returncode == 0
    assert _got(spy) == "" and _got(own) == "ack"
    offers = b.sub("edge-a", model_offer_topic("edge-a"))
    b.pub("edge-b", model_offer_topic("edge-a"), "downgrade")  # a device cannot write offers
    assert _got(offers) == ""
    assert b.pub(COORDINATOR, model_offer_topic("edge-a"), "genuine", retain=True).returncode == 0
    for who in ("edge-b", "edge-a"):  # nor replace the retained one: not even its own device
        b.pub(who, model_offer_topic("edge-a"), "replaced", retain=True)
    assert _got(b.sub("edge-a", model_offer_topic("edge-a"))) == "genuine"


def test_anonymous_and_unregistered_clients_get_nothing(acl_broker):
    b = acl_broker
    refused = b.pub(None, envelope_topic("edge-a"), "anonymous")
    assert refused.returncode != 0
    watcher = b.sub(COORDINATOR, envelope_topic("+"))
    b.pub("stranger", envelope_topic("stranger"), "unregistered")  # a valid certificate, no registry entry
    assert _got(watcher) == ""
    assert b.pub("rogue", envelope_topic("edge-a"), "impostor").returncode != 0  # edge-a's name, another CA


def test_acl_names_every_device_and_refuses_wildcards():
    text = acl_text(["edge-b", "edge-a"], COORDINATOR)
    assert text.index("user edge-a") < text.index("user edge-b")
    assert "%u" not in text and f"topic write {envelope_topic('edge-a')}" in text
    with pytest.raises(ValueError):
        acl_text(["edge/+"], COORDINATOR)


def test_a_reconnecting_client_is_known_by_the_certificate_it_presents_now(acl_broker):
    """A persistent session taken up again by another certificate: the broker must check the
    certificate of this connection. Against the embedded broker before the fix, amqtt kept
    the session's TLS object from the previous connection, and every reconnection to a
    persistent session was refused ("handshake not done yet"): an edge that lost its link
    never came back."""
    from medchain.mqtt import MqttEndpoint, MqttLink

    b = acl_broker

    def link(who: str) -> MqttLink:
        endpoint = MqttEndpoint(host="127.0.0.1", port=b.port, tls_ca=str(b.ca), tls_cert=str(b.ids[who].cert),
                                tls_key=str(b.ids[who].key), reconnect_min_s=0.2, reconnect_max_s=1.0)
        return MqttLink(endpoint, client_id="one-session", persistent_session=True)

    for who in ("edge-a", "edge-b"):
        with link(who) as client:
            assert client.wait_connected(10), f"{who} could not take up the session"
            watcher = b.sub(COORDINATOR, envelope_topic("+"))
            client.publish(envelope_topic("edge-a"), b"as edge-a")
            client.publish(envelope_topic(who), f"as {who}".encode())
            assert _got(watcher) == f"as {who}"
