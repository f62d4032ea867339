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

    def pub(self, who: str | None, topic: str, message: str) -> subprocess.CompletedProcess:
        return subprocess.run(["mosquitto_pub", *self._auth(who), "-q", "1", "-t", topic, "-m", message],
                              capture_output=True, text=True, timeout=20)

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


def test_anonymous_and_unregistered_clients_get_nothing(acl_broker):
    b = acl_broker
    refused = b.pub(None, envelope_topic("edge-a"), "anonymous")
    assert refused.returncode != 0
    watcher = b.sub(COORDINATOR, envelope_topic("+"))
    b.pub("stranger", envelope_topic("stranger"), "unregistered")  # a valid certificate, no registry entry
    assert _got(watcher) == ""


def test_acl_names_every_device_and_refuses_wildcards():
    text = acl_text(["edge-b", "edge-a"], COORDINATOR)
    assert text.index("user edge-a") < text.index("user edge-b")
    assert "%u" not in text and f"topic write {envelope_topic('edge-a')}" in text
    with pytest.raises(ValueError):
        acl_text(["edge/+"], COORDINATOR)
