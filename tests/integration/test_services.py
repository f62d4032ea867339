"""One real round trip through each service the integration tests rely on."""

import queue
import uuid

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, select


@pytest.mark.postgres
def test_postgres_round_trip(postgres_engine):
    meta = MetaData()
    items = Table(
        "items",
        meta,
        Column("id", Integer, primary_key=True),
        Column("name", String(64), nullable=False),
        Column("blob", LargeBinary, nullable=False),
    )
    meta.create_all(postgres_engine)
    payload = bytes(range(256))
    with postgres_engine.begin() as conn:
        conn.execute(items.insert(), [{"name": "a", "blob": payload}, {"name": "b", "blob": b""}])
    with postgres_engine.connect() as conn:
        rows = conn.execute(select(items.c.name, items.c.blob).order_by(items.c.id)).all()
        search_path = conn.exec_driver_sql("show search_path").scalar()
    assert [(r.name, bytes(r.blob)) for r in rows] == [("a", payload), ("b", b"")]
    assert search_path.strip('"').startswith("t_"), "each test gets a schema of its own"


@pytest.mark.mosquitto
def test_mosquitto_qos1_round_trip(mosquitto):
    topic = f"medchain-test/{uuid.uuid4().hex}"
    received: queue.Queue = queue.Queue()
    subscribed: queue.Queue = queue.Queue()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:8]}")
    sub.on_message = lambda c, u, msg: received.put((msg.topic, msg.payload, msg.qos))
    sub.on_subscribe = lambda c, u, mid, codes, props: subscribed.put(codes)
    sub.connect(mosquitto.host, mosquitto.port)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    pub.connect(mosquitto.host, mosquitto.port)
    pub.loop_start()
    try:
        sub.subscribe(topic, qos=1)
        codes = subscribed.get(timeout=5)
        assert not codes[0].is_failure
        payload = bytes(range(256)) * 64  # binary-safe, 16 KiB
        info = pub.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=5)
        assert info.is_published()
        got_topic, got_payload, got_qos = received.get(timeout=5)
        assert (got_topic, got_payload, got_qos) == (topic, payload, 1)
    finally:
        for client in (pub, sub):
            client.loop_stop()
            client.disconnect()
