"""The fleet registry, on SQLite and on the real PostgreSQL."""

import pytest

from cloud.fleet import FleetError, FleetRegistry, UnknownDevice
from medchain.identity import SigningKey
from medchain.protocol import Heartbeat

KEY = SigningKey.generate()


def beat(sent_ms, depth=3, key=KEY, version="m-1", device="edge-1"):
    return Heartbeat(device, sent_ms, depth, depth * 1000, 10**9, version).signed(key)


def exercise(fleet: FleetRegistry):
    d = fleet.enrol("edge-1", KEY.public, site="st-mary", group="radiology", profile="x86-cpu", now_ms=5)
    assert (d.device_id, d.public_key, d.revoked, d.state) == ("edge-1", KEY.public, False, "enrolled")
    with pytest.raises(FleetError, match="already enrolled"):
        fleet.enrol("edge-1", KEY.public, site="s", group="g", profile="p", now_ms=6)
    fleet.enrol("edge-2", SigningKey.generate().public, site="s", group="icu", profile="p", now_ms=7)
    assert [x.device_id for x in fleet.list(group="radiology")] == ["edge-1"]

    assert fleet.record_heartbeat(beat(100)) is True
    assert fleet.record_heartbeat(beat(50, depth=99)) is False  # stale: ignored
    got = fleet.get("edge-1")
    assert (got.last_seen_ms, got.queue_depth, got.model_version) == (100, 3, "m-1")
    with pytest.raises(FleetError, match="not signed by its key"):
        fleet.record_heartbeat(beat(200, key=SigningKey.generate()))
    with pytest.raises(UnknownDevice):
        fleet.record_heartbeat(beat(200, device="edge-9"))

    fleet.revoke("edge-1")
    assert fleet.get("edge-1").revoked
    with pytest.raises(FleetError, match="revoked"):
        fleet.record_heartbeat(beat(300))
    with pytest.raises(UnknownDevice):
        fleet.revoke("edge-9")


def test_fleet_on_sqlite(tmp_path):
    exercise(FleetRegistry(f"sqlite:///{tmp_path / 'fleet.db'}"))


@pytest.mark.postgres
def test_fleet_on_postgres(postgres_engine):
    exercise(FleetRegistry(postgres_engine))
