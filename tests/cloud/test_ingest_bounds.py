"""Work ingest does before it knows who sent a message is bounded, and each drop is counted:
size before decoding, a token bucket per device, the fleet registry before any ledger
query, and a waiting room bounded by bytes, not messages."""

from __future__ import annotations

import threading
import time

from cloud.catalog import Catalog
from cloud.ingest import IngestService, _Inbox, _RateLimit
from medchain.identity import RecipientKey, SigningKey
from medchain.mqtt import MqttEndpoint
from medchain.protocol import envelope_topic


class NoLedger:
    """Directory and registrar that fail the test if anything reaches them."""

    def __getattr__(self, name):
        raise AssertionError(f"ingest asked the ledger ({name}) before the cheap checks")


def service(tmp_path, now, known=frozenset({"edge-1"}), **kw) -> IngestService:
    return IngestService(MqttEndpoint(max_message_bytes=1000), directory=NoLedger(), store=None,
                         catalog=Catalog(f"sqlite:///{tmp_path / 'c.db'}"), registrar=NoLedger(),
                         ingest_key=SigningKey.generate(), meta_key=RecipientKey.generate(),
                         clock=lambda: now[0], known=known.__contains__, **kw)


def test_oversize_unknown_and_over_rate_are_dropped_unanswered_before_decoding(tmp_path):
    now = [0.0]
    ingest = service(tmp_path, now, rate=1.0, burst=2.0)
    assert ingest.handle(envelope_topic("edge-1"), b"\x00" * 1001) is None
    assert ingest.handle(envelope_topic("stranger"), b"junk") is None  # registry, not the ledger
    for _ in range(3):
        ingest.handle(envelope_topic("edge-1"), b"junk")  # two within the burst, then over the rate
    s = ingest.stats
    assert (s.oversize, s.unauthenticated, s.malformed, s.rate_limited) == (1, 1, 2, 1)
    now[0] += 1.0  # a second later one more is allowed
    ingest.handle(envelope_topic("edge-1"), b"junk")
    assert (s.malformed, s.rate_limited) == (3, 1)


def test_one_device_over_its_rate_does_not_spend_another_ones():
    now = [0.0]
    rate = _RateLimit(rate=1.0, burst=3.0, clock=lambda: now[0])
    assert [rate.allow("noisy") for _ in range(5)] == [True] * 3 + [False] * 2
    assert all(rate.allow("quiet") for _ in range(3))


def test_the_rate_table_keeps_at_most_its_bound_of_devices():
    rate = _RateLimit(rate=1.0, burst=1.0, clock=lambda: 0.0, max_devices=10)
    for i in range(100):
        rate.allow(f"spoofed-{i}")
    assert len(rate._buckets) == 10


def test_the_inbox_is_bounded_by_bytes_and_the_producer_waits():
    inbox = _Inbox(max_bytes=1000)
    inbox.put(("t", b"x" * 600))
    done = threading.Event()
    threading.Thread(target=lambda: (inbox.put(("t", b"y" * 600)), done.set()), daemon=True).start()
    time.sleep(0.2)
    assert not done.is_set()  # 1200 bytes would not fit: the MQTT thread waits (the broker holds the rest)
    assert inbox.get()[1][:1] == b"x"
    assert done.wait(5) and inbox.get()[1][:1] == b"y"
