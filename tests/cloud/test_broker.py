"""The embedded broker relays large payloads intact without formatting them for amqtt's log."""

from __future__ import annotations

import asyncio
import os
import queue
import time

from cloud.broker import EmbeddedBroker, _BroadcastQueue, _cheap_payload_repr, _Payload
from medchain.mqtt import MqttLink


def test_the_payload_repr_is_its_size_not_its_bytes():
    payload = _Payload(os.urandom(600_000))
    assert repr(payload) == "<600000-byte payload>"
    assert payload == bytes(payload)  # still the same bytes for everything else


def test_the_amqtt_broker_gets_the_cheap_repr_queue():
    # fails when an amqtt upgrade renames or replaces the queue: re-check the workaround then
    from amqtt.broker import Broker

    async def build():
        broker = Broker({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}}})
        _cheap_payload_repr(broker)
        return broker

    broker = asyncio.run(build())
    assert isinstance(broker._broadcast_queue, _BroadcastQueue)


def test_a_large_message_crosses_the_embedded_broker_intact():
    payload = os.urandom(3 * 1024 * 1024 + 17)
    received: queue.Queue = queue.Queue()
    with EmbeddedBroker() as broker:
        with MqttLink(broker.endpoint, subscriptions=[("t/big", 1)],
                      on_message=lambda topic, data: received.put((topic, data))) as sub, \
                MqttLink(broker.endpoint) as pub:
            assert sub.wait_connected(10) and pub.wait_connected(10)
            deadline = time.monotonic() + 10
            topic = data = None
            while topic is None and time.monotonic() < deadline:
                pub.publish("t/big", payload).wait_for_publish(10)
                try:
                    topic, data = received.get(timeout=1)
                except queue.Empty:  # the subscription may not be in place yet: send again
                    continue
    assert topic == "t/big"
    assert bytes(data) == payload
