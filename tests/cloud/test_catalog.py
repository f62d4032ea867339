"""The catalog on SQLite and on PostgreSQL, through the same code."""

import pytest

from cloud.catalog import Catalog, CatalogEntry, Receipt


def entry(eid="a" * 32, seq=1):
    return CatalogEntry(eid, "edge-1", seq, "ff" * 32, 1234, 99, Receipt(3, 0),
                        {"modality": "CT", "patient": "tok"})


def exercise(catalog: Catalog):
    assert catalog.record(entry()) is True
    assert catalog.record(entry()) is False  # idempotent
    assert catalog.record(entry("b" * 32, seq=1)) is False  # (device, sequence) is unique
    assert catalog.record(entry("c" * 32, seq=2)) is True
    assert catalog.get("a" * 32) == entry()
    assert catalog.get("z" * 32) is None
    assert catalog.by_sequence("edge-1", 2) == "c" * 32
    assert catalog.by_sequence("edge-1", 3) is None
    assert [e.envelope_id for e in catalog.entries(device_id="edge-1")] == ["a" * 32, "c" * 32]
    assert catalog.count() == 2


def test_catalog_on_sqlite(tmp_path):
    exercise(Catalog(f"sqlite:///{tmp_path / 'catalog.db'}"))


@pytest.mark.postgres
def test_catalog_on_postgres(postgres_engine):
    exercise(Catalog(postgres_engine))
