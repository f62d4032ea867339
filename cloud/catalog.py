"""The cloud's catalog of what ingest has stored and registered, behind SQLAlchemy.

One row per envelope: who sent it with which sequence number, its Merkle root, where it
landed on the ledger, and its de-identified metadata (pseudonymous ids, modality, consent
flags). Ingest uses it to answer duplicates and refuse a reused sequence number; training
uses it to find images. SQLite by default, PostgreSQL through the same URL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    select,
)
from sqlalchemy.engine import Engine

from cloud.database import engine_for
from sqlalchemy.exc import IntegrityError

__all__ = ["Catalog", "Receipt", "CatalogEntry"]

_meta = MetaData()
ingested = Table(
    "ingested",
    _meta,
    Column("envelope_id", String(32), primary_key=True),
    Column("device_id", String(128), nullable=False),
    Column("sequence", BigInteger, nullable=False),
    Column("merkle_root", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("stored_ms", BigInteger, nullable=False),
    Column("ledger_height", BigInteger, nullable=False),
    Column("tx_index", Integer, nullable=False),
    Column("meta", Text, nullable=False),
    UniqueConstraint("device_id", "sequence", name="uq_device_sequence"),
)


@dataclass(frozen=True, slots=True)
class Receipt:
    """Where an envelope's registration landed on the ledger."""

    ledger_height: int
    tx_index: int


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    envelope_id: str
    device_id: str
    sequence: int
    merkle_root: str
    size: int
    stored_ms: int
    receipt: Receipt
    meta: dict[str, Any]


def _entry(row) -> CatalogEntry:
    return CatalogEntry(
        row.envelope_id, row.device_id, row.sequence, row.merkle_root, row.size, row.stored_ms,
        Receipt(row.ledger_height, row.tx_index), json.loads(row.meta),
    )


class Catalog:
    def __init__(self, url_or_engine: str | Engine):
        self.engine = engine_for(url_or_engine)
        _meta.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def get(self, envelope_id: str) -> CatalogEntry | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(ingested).where(ingested.c.envelope_id == envelope_id)).first()
        return _entry(row) if row else None

    def by_sequence(self, device_id: str, sequence: int) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(ingested.c.envelope_id).where(
                    ingested.c.device_id == device_id, ingested.c.sequence == sequence
                )
            ).scalar()

    def record(self, entry: CatalogEntry) -> bool:
        """Insert; False if the envelope was already recorded (another worker won)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    ingested.insert().values(
                        envelope_id=entry.envelope_id, device_id=entry.device_id,
                        sequence=entry.sequence, merkle_root=entry.merkle_root, size=entry.size,
                        stored_ms=entry.stored_ms, ledger_height=entry.receipt.ledger_height,
                        tx_index=entry.receipt.tx_index, meta=json.dumps(entry.meta, sort_keys=True),
                    )
                )
        except IntegrityError:
            return False
        return True

    def entries(self, **where: Any) -> list[CatalogEntry]:
        query = select(ingested).order_by(ingested.c.stored_ms, ingested.c.envelope_id)
        for column, value in where.items():
            query = query.where(ingested.c[column] == value)
        with self.engine.connect() as conn:
            return [_entry(r) for r in conn.execute(query)]

    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(ingested)).scalar_one()
