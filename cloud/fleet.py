"""The fleet registry: every edge device, its key, group and latest health, behind SQLAlchemy.

Operators enrol and revoke devices here (the same events also go on the ledger, which is
the authority that ingest checks); the registry adds what the ledger should not hold: the
latest heartbeat, the model version each device runs, its queue and disk. A heartbeat is
accepted only when signed by the device's enrolled key and newer than the last one.
SQLite by default; PostgreSQL through the same URL.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    MetaData,
    String,
    Table,
    select,
    update,
)
from sqlalchemy.engine import Engine

from cloud.database import engine_for
from sqlalchemy.exc import IntegrityError

from medchain.identity import VerifyKey
from medchain.errors import VerificationError
from medchain.protocol import Heartbeat

from cloud.errors import FleetError, UnknownDevice

__all__ = ["FleetRegistry", "Device", "FleetError", "UnknownDevice"]


_meta = MetaData()
devices = Table(
    "devices",
    _meta,
    Column("device_id", String(128), primary_key=True),
    Column("public_key", String(64), nullable=False),
    Column("site", String(128), nullable=False),
    Column("device_group", String(128), nullable=False),
    Column("profile", String(128), nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("enrolled_ms", BigInteger, nullable=False),
    Column("last_seen_ms", BigInteger, nullable=False, default=0),
    Column("queue_depth", BigInteger, nullable=False, default=0),
    Column("queue_bytes", BigInteger, nullable=False, default=0),
    Column("disk_free_bytes", BigInteger, nullable=False, default=0),
    Column("model_version", String(128), nullable=False, default=""),
    Column("state", String(64), nullable=False, default="enrolled"),
)


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    public_key: VerifyKey
    site: str
    group: str
    profile: str
    revoked: bool
    enrolled_ms: int
    last_seen_ms: int
    queue_depth: int
    queue_bytes: int
    disk_free_bytes: int
    model_version: str
    state: str


def _device(row) -> Device:
    return Device(
        row.device_id, VerifyKey.from_hex(row.public_key), row.site, row.device_group, row.profile,
        row.revoked, row.enrolled_ms, row.last_seen_ms, row.queue_depth, row.queue_bytes,
        row.disk_free_bytes, row.model_version, row.state,
    )


class FleetRegistry:
    def __init__(self, url_or_engine: str | Engine):
        self.engine = engine_for(url_or_engine)
        _meta.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def enrol(self, device_id: str, public_key: VerifyKey, *, site: str, group: str,
              profile: str, now_ms: int) -> Device:
        try:
            with self.engine.begin() as conn:
                conn.execute(devices.insert().values(
                    device_id=device_id, public_key=public_key.hex(), site=site,
                    device_group=group, profile=profile, revoked=False, enrolled_ms=now_ms,
                ))
        except IntegrityError:
            raise FleetError(f"device {device_id!r} is already enrolled") from None
        return self.get(device_id)

    def revoke(self, device_id: str) -> None:
        with self.engine.begin() as conn:
            done = conn.execute(
                update(devices).where(devices.c.device_id == device_id).values(revoked=True, state="revoked")
            )
        if not done.rowcount:
            raise UnknownDevice(f"no device {device_id!r} is enrolled")

    def get(self, device_id: str) -> Device:
        with self.engine.connect() as conn:
            row = conn.execute(select(devices).where(devices.c.device_id == device_id)).first()
        if row is None:
            raise UnknownDevice(f"no device {device_id!r} is enrolled")
        return _device(row)

    def knows(self, device_id: str) -> bool:
        """Whether the registry holds ``device_id`` (revoked or not): ingest asks this before
        it spends a ledger query on a device id it has never seen."""
        with self.engine.connect() as conn:
            return conn.execute(select(devices.c.device_id).where(devices.c.device_id == device_id)).first() is not None

    def list(self, group: str | None = None) -> list[Device]:
        query = select(devices).order_by(devices.c.device_id)
        if group is not None:
            query = query.where(devices.c.device_group == group)
        with self.engine.connect() as conn:
            return [_device(r) for r in conn.execute(query)]

    def record_heartbeat(self, beat: Heartbeat) -> bool:
        """Store a verified heartbeat; False if it is older than what we have."""
        device = self.get(beat.device_id)
        if device.revoked:
            raise FleetError(f"heartbeat from revoked device {beat.device_id!r}")
        try:
            beat.verify(device.public_key)
        except VerificationError:
            raise FleetError(f"heartbeat of {beat.device_id!r} is not signed by its key") from None
        with self.engine.begin() as conn:
            done = conn.execute(
                update(devices)
                .where(devices.c.device_id == beat.device_id, devices.c.last_seen_ms < beat.sent_ms)
                .values(last_seen_ms=beat.sent_ms, queue_depth=beat.queue_depth,
                        queue_bytes=beat.queue_bytes, disk_free_bytes=beat.disk_free_bytes,
                        model_version=beat.model_version, state=beat.state)
            )
        return bool(done.rowcount)
