"""What an attacker who can read the broker sees of a site's traffic, through a real Mosquitto
started from the generated configuration and ACL (``secure_mosquitto``).

The other attacks on the wire have their tests beside the code they exercise (the map is in
``docs/security.md``): the ACL with ``mosquitto_pub``/``mosquitto_sub`` and a device's kit in
``tests/cloud/test_brokerconf.py``, forged acks in ``test_faults.py``, the downgrade in
``test_rollout.py``, the bounds on work before authentication in ``tests/cloud/``.
"""

from __future__ import annotations

import queue

import pytest

from medchain.mqtt import MqttLink
from medchain.protocol import envelope_subscription

pytestmark = [pytest.mark.slow]


def test_the_broker_carries_nothing_clinical_in_clear_text(secure_mosquitto, site_on, wait_for):
    """Everything the broker (or anyone who can read the envelope topics) sees of a study:
    none of the values ingest opens from the sealed metadata — patient token, pseudonymous
    study and instance ids, consent — appears in the bytes on the wire. Before the metadata
    was sealed the header carried them in clear."""
    site = site_on(secure_mosquitto.coordinator_endpoint, broker=secure_mosquitto)
    site.enroll()
    payloads = queue.Queue()
    watcher = MqttLink(secure_mosquitto.coordinator_endpoint, subscriptions=[(envelope_subscription(), 1)],
                       persistent_session=False, on_message=lambda t, p: t.endswith(site.device_id + "/envelopes")
                       and payloads.put(bytes(p)), client_id="wire-watcher")
    with site.coordinator, watcher:
        assert watcher.wait_connected(10)
        site.start_edge()
        _, result = site.send("CT", studies=2, seed=61, per_study=2)
        assert result.success == 4 and site.settled()
    wire = b"".join(payloads.get_nowait() for _ in range(payloads.qsize()))
    assert wire, "the watcher saw the envelopes"
    entries = list(site.coordinator.catalog.entries())
    assert len(entries) == 4
    secrets = set()
    for entry in entries:
        meta = entry.meta
        assert meta["patient_token"] and "consent" in meta
        secrets |= {v for k, v in meta.items() if isinstance(v, str) and len(v) >= 8 and k != "device_id"}
    assert len(secrets) >= 4  # at least the tokens and pseudonymous uids
    leaked = sorted(s for s in secrets if s.encode() in wire)
    assert leaked == [], leaked
    for word in (b"patient", b"consent", b"prediction", b"sop_instance"):
        assert word not in wire
