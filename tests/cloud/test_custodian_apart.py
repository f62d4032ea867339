"""The custodian apart: whoever reads the coordinator's folder and the store decrypts nothing;
the custodian (its own server, the only key holder) releases only what the ledger grants, and
only to the training principal's fresh, signed requests. A real 4-validator ledger decides."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

from cloud.catalog import CatalogEntry, Receipt
from cloud.config import load_config
from cloud.custodian_protocol import ReleaseRequest
from cloud.custodian_service import CustodianConfig, CustodianServer, RemoteCustodian, load_custodian_config
from cloud.errors import CustodianRefused
from cloud.keybackend import provision_pkcs11
from cloud.objectstore import LocalObjectStore
from cloud.provision import init_deployment
from ledger.cluster import LocalCluster
from ledger.genesis import Params
from ledger.transactions import DeviceEnrolled, ImageRegistered
from medchain.errors import ConfigError, DecryptionError, KeyFileError
from medchain.identity import RecipientKey, RecipientPublicKey, SigningKey
from medchain.sealing import new_object_key, open_envelope, package

DEVICE = SigningKey.generate()
_seq = iter(range(1, 1_000_000))


def private_keys_in(folder: Path) -> list[RecipientKey]:
    """Every X25519 private key a reader of ``folder`` finds (any file, any name)."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            try:
                found.append(RecipientKey.load(path))
            except KeyFileError:
                pass
    return found


def test_the_coordinators_folder_holds_no_key_that_opens_the_store(tmp_path):
    """Attack: read the coordinator's config and keys folder, take the store, decrypt. Against
    the layout before this change, ``cloud init`` wrote ``keys/custodian.key`` (the private
    X25519 key) beside the ingest, operator and model keys, and ``[keys] custodian`` named it:
    every envelope opened with it, no ledger check, no audit. Now the coordinator holds the
    public key only, and the private key is in the custodian's folder (its own user or host)."""
    ledger = tmp_path / "ledger"
    root = tmp_path / "cloud"
    path, made = init_deployment(root, genesis=ledger / "genesis.json", ingest_key=ledger / "keys" / "ingest.key",
                                 operator_key=None, training_key=None)
    config = load_config(path)
    public = RecipientPublicKey.load(config.custodian_key)  # what enrolment hands devices
    assert config.custodian_key == root / "keys" / "custodian.pub"
    envelope = package({"dicom": b"a patient's image"}, new_object_key(public), device_id="d", sequence=1,
                       signer=DEVICE, created_ms=0)
    coordinators = [k for k in private_keys_in(root) if not k_in(root / "custodian", k)]
    assert all(k.public != public for k in coordinators)  # only the metadata key is there
    for key in coordinators:
        with pytest.raises(DecryptionError):
            open_envelope(envelope, key, DEVICE.public)
    (custodian_key,) = private_keys_in(root / "custodian")
    assert custodian_key.public == public
    assert (root / "custodian" / "keys" / "custodian.key").stat().st_mode & 0o077 == 0
    assert "custodian/custodian.toml" in made
    # the old layout is refused, not silently kept
    old = tmp_path / "old"
    (old / "keys").mkdir(parents=True)
    RecipientKey.generate().save(old / "keys" / "custodian.key")
    with pytest.raises(Exception, match="private key is in the coordinator's keys"):
        init_deployment(old, genesis=ledger / "genesis.json", ingest_key=ledger / "keys" / "ingest.key",
                        operator_key=None, training_key=None)


def k_in(folder: Path, key: RecipientKey) -> bool:
    return any(k.public == key.public for k in private_keys_in(folder))


# -- the custodian server, with a real ledger -----------------------------------------------

pytestmark_slow = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(4, tmp_path_factory.mktemp("apart"),
                     params=Params(checkpoint_interval=8, window=32, status_ms=200))
    c.start()
    with c.client("operator") as op:
        assert op.submit(DeviceEnrolled("dev-apart", DEVICE.public.raw, "site", "ct")).committed
    yield c
    c.close()


def ingested(ingest, store, env, consent=("training",)) -> CatalogEntry:
    store.put(env)
    h = env.header
    result = ingest.submit(ImageRegistered(
        h.object_id, h.merkle_root, f"tok-{os.urandom(4).hex()}", "st", "se", "in", "CR",
        consent, "default", "dev-apart", h.sequence))
    assert result.committed, result.reason
    return CatalogEntry(env.envelope_id, "dev-apart", h.sequence, h.merkle_root.hex(), 0, 0,
                        Receipt(result.height, result.index), {})


def sealed(public, data: bytes, key=None):
    return package({"dicom": data, "meta": b"{}"}, key or new_object_key(public), device_id="dev-apart",
                   sequence=next(_seq), signer=DEVICE, created_ms=0)


@pytest.fixture
def served(cluster, tmp_path):
    """A custodian server (file backend) on a socket, its store, and the ingest client."""
    key = RecipientKey.generate()
    key.save(tmp_path / "custodian.key")
    store_dir = tmp_path / "store"
    config = CustodianConfig(socket=tmp_path / "c.sock", key=tmp_path / "custodian.key", genesis=cluster.genesis_path,
                             ledger_key=cluster.key_path("custodian"), store_url=str(store_dir))
    with CustodianServer(config) as server, cluster.client("ingest") as ingest:
        yield server, LocalObjectStore(store_dir), ingest, key.public


def training(server, cluster, **options) -> RemoteCustodian:
    return RemoteCustodian(server.config.socket, SigningKey.load(cluster.key_path("training")), **options)


@pytest.mark.slow
def test_training_reads_granted_images_through_the_custodian_and_nothing_else(served, cluster):
    server, store, ingest, public = served
    a = ingested(ingest, store, sealed(public, b"image a"))
    refused = ingested(ingest, store, sealed(public, b"image b"), consent=())
    released, report = training(server, cluster).release([a, refused], "training", names=["dicom"])
    assert [(r.entry, r.parts) for r in released] == [(a, {"dicom": b"image a"})]
    assert report.granted == 1 and sum(report.denied.values()) == 1
    assert report.denied_ids == [(refused.envelope_id, "no consent for purpose")]
    assert server.counts["released"] == 1 and server.counts["denied"] == 1
    # the ledger's audit names the training principal as the user, decided per image
    with cluster.client("training") as t:
        audit = {x["image"].hex(): x for x in t.audit(user="training")}
    assert audit[a.envelope_id]["granted"] and not audit[refused.envelope_id]["granted"]


@pytest.mark.slow
def test_the_ledger_check_runs_inside_the_custodian(served, cluster, tmp_path):
    """A swapped object is refused by the custodian process itself (the check of
    cloud/custodian.py, run where the key is)."""
    server, store, ingest, public = served
    a = ingested(ingest, store, sealed(public, b"image a"))
    b = ingested(ingest, store, sealed(public, b"image b, another patient"))
    envelopes = tmp_path / "store" / "envelopes"
    (envelopes / f"{a.envelope_id}.cbor").write_bytes((envelopes / f"{b.envelope_id}.cbor").read_bytes())
    released, report = training(server, cluster).release([a], "training")
    assert released == [] and report.unreadable == {"stored object is another image's": 1}
    assert server.counts["unreadable"] == 1


@pytest.mark.slow
def test_only_the_training_principals_fresh_signed_requests_are_served(served, cluster):
    server, store, ingest, public = served
    a = ingested(ingest, store, sealed(public, b"image a"))
    ingest_key = SigningKey.load(cluster.key_path("ingest"))
    # the ingest principal (the internet-facing process) is not served
    with pytest.raises(CustodianRefused, match="not served"):
        RemoteCustodian(server.config.socket, ingest_key, principal="ingest").release([a], "training")
    # nor is a request claiming to be training's, signed by another key
    with pytest.raises(CustodianRefused, match="signature"):
        RemoteCustodian(server.config.socket, ingest_key, principal="training").release([a], "training")
    # a request of training's, replayed (or stale), is refused
    remote = training(server, cluster)
    request = ReleaseRequest.new("training", "training", [(a.envelope_id, a.device_id)],
                                 now_ms=int(time.time() * 1000))
    data = request.signed(SigningKey.load(cluster.key_path("training")))
    assert server.answer(data).error is None
    assert "replayed" in server.answer(data).error
    stale = dataclasses.replace(request, time_ms=request.time_ms - 120_000, nonce=os.urandom(16))
    assert "stale" in server.answer(stale.signed(SigningKey.load(cluster.key_path("training")))).error
    assert server.answer(b"\xa1\x00junk").error.startswith("refused: malformed")
    assert server.counts["requests refused"] == 5
    assert remote.release([a], "training")[1].granted == 1


@pytest.mark.slow
def test_a_custodian_with_its_key_in_a_softhsm_token(cluster, softhsm_token, tmp_path):
    """The same service, the key in a real PKCS#11 token (SoftHSM2), its configuration read
    from custodian.toml as `medchain cloud custodian` reads it."""
    token = softhsm_token("custodian-service")
    public = provision_pkcs11(token)
    (tmp_path / "custodian.toml").write_text(
        f'[custodian]\nsocket = "c.sock"\n\n[custodian.pkcs11]\nmodule = "{token.module}"\n'
        f'token = "{token.token}"\npin_file = "{token.pin_file}"\nwrapped = "{token.wrapped}"\n'
        f'key_label = "{token.key_label}"\n\n[ledger]\ngenesis = "{cluster.genesis_path}"\n'
        f'key = "{cluster.key_path("custodian")}"\n\n[store]\nurl = "store"\n')
    config = load_custodian_config(tmp_path / "custodian.toml")
    assert config.key == token
    store = LocalObjectStore(tmp_path / "store")
    with CustodianServer(config) as server, cluster.client("ingest") as ingest:
        assert server.backend.public == public
        a = ingested(ingest, store, sealed(public, b"pixels via the token"))
        released, _ = training(server, cluster).release([a], "training", names=["dicom"])
    assert released[0].parts == {"dicom": b"pixels via the token"}


def test_init_with_a_token_puts_the_custodian_key_in_it(tmp_path, softhsm_token):
    """`cloud init --pkcs11-...`: the token makes the key, the custodian's configuration
    names the token, the coordinator gets the public key, and no file anywhere in the
    deployment holds the private key in the clear."""
    ledger = tmp_path / "ledger"
    token = softhsm_token("init")
    root = tmp_path / "cloud"
    path, _ = init_deployment(root, genesis=ledger / "genesis.json", ingest_key=ledger / "keys" / "ingest.key",
                                 operator_key=None, training_key=None, pkcs11=token)
    public = RecipientPublicKey.load(load_config(path).custodian_key)
    custodian = load_custodian_config(root / "custodian" / "custodian.toml")
    assert custodian.key == token and custodian.ledger_key == ledger / "keys" / "custodian.key"
    assert all(k.public != public for k in private_keys_in(root))
    assert not (root / "custodian" / "keys" / "custodian.key").exists()
    from cloud.keybackend import Pkcs11KeyBackend

    with Pkcs11KeyBackend(custodian.key) as backend:
        assert backend.public == public


@pytest.mark.slow
def test_the_custodian_serves_its_refusals_and_releases_as_prometheus_metrics(cluster, tmp_path):
    """With ``metrics_port`` the custodian answers GET /metrics (Prometheus text): a forged
    people's fetch is counted under medchain_auth_failures_total, a refused service request
    and a release under medchain_custodian_events. Before, its refusals were only in its log
    and its exit line."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    from cloud.access_protocol import FetchRequest

    key = RecipientKey.generate()
    key.save(tmp_path / "custodian.key")
    (tmp_path / "custodian.toml").write_text(
        f'[custodian]\nsocket = "c.sock"\nkey = "custodian.key"\nmetrics_port = 0\n\n'
        f'[ledger]\ngenesis = "{cluster.genesis_path}"\nkey = "{cluster.key_path("custodian")}"\n\n'
        f'[store]\nurl = "store"\n')
    config = load_custodian_config(tmp_path / "custodian.toml")
    assert config.metrics_port == 0 and config.metrics_host == "127.0.0.1"
    exposed = tmp_path / "exposed.toml"
    exposed.write_text((tmp_path / "custodian.toml").read_text().replace(
        "metrics_port = 0\n", 'metrics_port = 0\nmetrics_host = "0.0.0.0"\n'))
    with pytest.raises(ConfigError, match="loopback only"):  # plain HTTP on the key holder
        load_custodian_config(exposed)
    store = LocalObjectStore(tmp_path / "store")
    with CustodianServer(config) as server, cluster.client("ingest") as ingest:
        a = ingested(ingest, store, sealed(key.public, b"image a"))
        assert training(server, cluster).release([a], "training")[1].granted == 1
        with pytest.raises(CustodianRefused, match="signature"):
            RemoteCustodian(server.config.socket, SigningKey.load(cluster.key_path("ingest")),
                            principal="training").release([a], "training")
        forged = FetchRequest.new("training", "diagnosis", [(a.envelope_id, 1)],
                                  now_ms=int(time.time() * 1000)).signed(SigningKey.generate())
        assert "signature does not verify" in server.respond(forged).decode("latin-1")
        host, port = server.metrics_address
        with urlopen(f"http://{host}:{port}/metrics", timeout=5) as reply:
            kind, text = reply.headers["Content-Type"], reply.read().decode()
    assert kind.startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("medchain_custodian_events_total", (("event", "released"),))] == 1
    assert samples[("medchain_custodian_events_total", (("event", "requests refused"),))] == 1
    assert samples[("medchain_auth_failures_total", (("reason", "bad-signature"), ("where", "custodian")))] == 1
