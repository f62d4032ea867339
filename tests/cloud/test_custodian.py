"""The custodian releases a data key only for the object the ledger registered: attacks on
the object store, with a real 4-validator ledger deciding access."""

from __future__ import annotations

import dataclasses
import os

import pytest

from cloud.catalog import CatalogEntry, Receipt
from cloud.custodian import Custodian
from cloud.objectstore import LocalObjectStore
from ledger.cluster import LocalCluster
from ledger.genesis import Params
from ledger.transactions import DeviceEnrolled, ImageRegistered
from medchain.identity import RecipientKey, SigningKey
from medchain.sealing import ObjectKey, new_object_key, package

pytestmark = pytest.mark.slow

DEVICE, CUSTODIAN = SigningKey.generate(), RecipientKey.generate()


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    """(ingest, training) clients of a cluster where device ``dev-c`` is enrolled."""
    c = LocalCluster(4, tmp_path_factory.mktemp("custodian"),
                     params=Params(checkpoint_interval=8, window=32, status_ms=200))
    c.start()
    with c.client("operator") as op:
        assert op.submit(DeviceEnrolled("dev-c", DEVICE.public.raw, "site", "ct")).committed
    with c.client("ingest") as ingest, c.client("training") as training:
        yield ingest, training
    c.close()


_seq = iter(range(1, 1_000_000))


def sealed(data: bytes, key: ObjectKey | None = None):
    return package({"dicom": data}, key or new_object_key(CUSTODIAN.public), device_id="dev-c",
                   sequence=next(_seq), signer=DEVICE, created_ms=0)


def ingested(ingest, store, env) -> CatalogEntry:
    """Store ``env`` and register it on the ledger consented for training, as ingest does."""
    store.put(env)
    h = env.header
    result = ingest.submit(ImageRegistered(
        h.object_id, h.merkle_root, f"tok-{os.urandom(4).hex()}", "st", "se", "in", "CR",
        ("training",), "default", "dev-c", h.sequence))
    assert result.committed, result.reason
    return CatalogEntry(env.envelope_id, "dev-c", h.sequence, h.merkle_root.hex(), 0, 0,
                        Receipt(result.height, result.index), {})


@pytest.fixture
def world(clients, tmp_path):
    ingest, training = clients
    store = LocalObjectStore(tmp_path / "store")
    return ingest, store, Custodian(training, store, CUSTODIAN, user="training"), tmp_path


def test_an_untouched_store_releases_what_was_granted(world):
    ingest, store, custodian, _ = world
    a = ingested(ingest, store, sealed(b"image a"))
    released, report = custodian.release([a], "training")
    assert [r.parts["dicom"] for r in released] == [b"image a"]
    assert report.granted == 1 and not report.unreadable


def test_another_images_envelope_under_an_images_name_is_refused(world):
    """Image b's stored envelope copied over image a's (the two header files swapped, or b's
    stored under a's key). Against the code before this change, the custodian released b's
    pixels under a's access grant: b's signature and Merkle root verify on their own."""
    ingest, store, custodian, root = world
    a = ingested(ingest, store, sealed(b"image a"))
    b = ingested(ingest, store, sealed(b"image b, another patient"))
    envelopes = root / "store" / "envelopes"
    (envelopes / f"{a.envelope_id}.cbor").write_bytes(
        (envelopes / f"{b.envelope_id}.cbor").read_bytes())
    released, report = custodian.release([a], "training")
    assert released == [] and report.granted == 1
    assert report.unreadable == {"stored object is another image's": 1}


def test_an_object_that_is_not_the_registered_one_is_refused(world):
    """A second envelope sealed under a registered image's id (a device re-sending different
    content, or a store restored from elsewhere): the object id matches, the Merkle root does
    not match the ledger's IMAGE_REGISTERED record. Against the code before this change, the
    custodian released the unregistered content."""
    ingest, store, custodian, _ = world
    key = new_object_key(CUSTODIAN.public)
    a = ingested(ingest, store, sealed(b"image a", key))
    other = sealed(b"content the ledger never saw", dataclasses.replace(key))
    store.withdraw(a.envelope_id)
    store.put(other)
    released, report = custodian.release([a], "training")
    assert released == [] and report.granted == 1
    assert report.unreadable == {"stored object is not the one the ledger registered": 1}
