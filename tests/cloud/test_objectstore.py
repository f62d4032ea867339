"""The local object store: ciphertext only, atomic, idempotent, and honest about damage."""

import pytest

from cloud.objectstore import LocalObjectStore, ObjectMissing, S3ObjectStore, ObjectStoreError, open_store
from medchain.identity import RecipientKey, SigningKey
from medchain.sealing import open_envelope, seal

DEVICE, CUSTODIAN = SigningKey.generate(), RecipientKey.generate()


def envelope(data=b"pixels" * 30000):
    return seal({"dicom": data}, device_id="d", sequence=1, signer=DEVICE,
                recipient=CUSTODIAN.public, created_ms=0, chunk_size=64 * 1024)


def test_put_get_round_trip_and_idempotence(tmp_path):
    store = LocalObjectStore(tmp_path)
    env = envelope()
    assert store.put(env) is True
    assert store.put(env) is False
    assert store.has(env.envelope_id) and list(store.ids()) == [env.envelope_id]
    back = store.get(env.envelope_id)
    assert back == env
    assert open_envelope(back, CUSTODIAN, DEVICE.public)["dicom"] == b"pixels" * 30000


def test_store_holds_ciphertext_only(tmp_path):
    store = LocalObjectStore(tmp_path)
    store.put(envelope(b"PATIENT-VISIBLE-PIXELS" * 1000))
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"PATIENT-VISIBLE-PIXELS" not in path.read_bytes()


def test_missing_and_corrupt_objects_are_reported(tmp_path):
    store = LocalObjectStore(tmp_path)
    with pytest.raises(ObjectMissing):
        store.get("0" * 32)
    with pytest.raises(ObjectMissing):
        store.get("../../etc/passwd")
    env = envelope()
    store.put(env)
    pack = next((tmp_path / "packs").glob("*/*"))
    pack.write_bytes(b"\x00" * pack.stat().st_size)
    with pytest.raises(ObjectStoreError, match="chunk 0 is corrupt"):
        store.get(env.envelope_id)
    pack.write_bytes(b"\x00" * 10)
    with pytest.raises(ObjectStoreError, match="wrong size"):
        store.get(env.envelope_id)
    pack.unlink()
    with pytest.raises(ObjectMissing, match="missing"):
        store.get(env.envelope_id)


def test_a_crash_mid_put_leaves_no_object_and_garbage_is_collected(tmp_path):
    store = LocalObjectStore(tmp_path)
    kept, lost = envelope(), envelope()
    store.put(kept)
    # a crash after the ciphertext, before the header: write only the pack of `lost`
    store._write(store._pack_key(lost.header.merkle_root), b"".join(lost.bodies))
    assert not store.has(lost.envelope_id)
    assert store.collect_garbage(older_than_s=0) == 1
    assert store.get(kept.envelope_id) == kept


@pytest.fixture
def s3_store():
    """S3ObjectStore against moto's S3 server over real HTTP: no S3-compatible server
    (MinIO, Ceph) can be installed on our machines, so an emulator is the closest peer."""
    boto3 = pytest.importorskip("boto3", reason="boto3 not installed (pip install medchain[s3])")
    server_mod = pytest.importorskip("moto.server", reason="moto[server] not installed")
    from cloud.broker import free_port

    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket="medchain")
    yield S3ObjectStore("medchain", "site-a", client=client)
    server.stop()


def test_s3_backend_same_contract(s3_store):
    env = envelope()
    assert s3_store.put(env) is True and s3_store.put(env) is False
    assert s3_store.has(env.envelope_id) and list(s3_store.ids()) == [env.envelope_id]
    assert s3_store.get(env.envelope_id) == env
    with pytest.raises(ObjectMissing):
        s3_store.get("0" * 32)
    lost = envelope()
    s3_store._write(s3_store._pack_key(lost.header.merkle_root), b"".join(lost.bodies))
    assert s3_store.collect_garbage(older_than_s=0, now=10**10) == 1
    assert s3_store.get(env.envelope_id) == env


def test_open_store_by_url(tmp_path):
    assert isinstance(open_store(str(tmp_path / "a")), LocalObjectStore)
    assert isinstance(open_store(f"file://{tmp_path / 'b'}"), LocalObjectStore)


def test_swapped_objects_are_refused(tmp_path):
    """Two envelopes' header files swapped in the store (an operator's slip, or someone with
    write access to the bucket): asking for one must not hand back the other. Against the
    code before this change, ``get(a)`` returned envelope b, whose signature and Merkle root
    verify, so b was decrypted under a's access grant."""
    store = LocalObjectStore(tmp_path)
    a, b = envelope(b"a" * 1000), envelope(b"b" * 1000)
    store.put(a)
    store.put(b)
    file_a = tmp_path / "envelopes" / f"{a.envelope_id}.cbor"
    file_b = tmp_path / "envelopes" / f"{b.envelope_id}.cbor"
    data_a, data_b = file_a.read_bytes(), file_b.read_bytes()
    file_a.write_bytes(data_b)
    file_b.write_bytes(data_a)
    for asked in (a, b):
        with pytest.raises(ObjectStoreError, match="holds envelope .* not the one asked for"):
            store.get(asked.envelope_id)
