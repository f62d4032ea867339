"""Training on the cloud store, for real: simulated CR studies go scanner -> edge (with the
site's clinical records: labels and consent) -> Mosquitto -> cloud -> ledger; then
``medchain cloud train`` asks the custodian — its own OS process (``medchain cloud
custodian``), the only holder of the custodian key — which asks the ledger for every image
and decrypts only the consented ones
(one patient's consent revoked on the ledger after acquisition), splits by patient, trains
and exports. Every attempt is on the audit log, and the model card's chain turns the raw
DICOM back into exactly what training fed the model."""

import hashlib
import io
import json
import time

import numpy as np
import pydicom
import pytest

from cloud.custodian import Custodian
from cloud.errors import CustodianError, TrainingDataError
from cloud.objectstore import open_store
from cloud.training import gather
from edge_agent.pseudonyms import Pseudonymizer
from edge_agent.records import RecordStore, pseudonymize, read_records_file
from medchain.canonical import canonical_bytes
from ledger.client import LedgerClient
from medchain.identity import SigningKey
from ledger.transactions import ConsentSet
from medchain_app.cli import main
from medchain.sealing import open_envelope
from models.card import ModelCard
from models.modality import modality_values
from models.transforms import Compose, from_config
from scanner_sim.studies import generate_studies, write_ground_truth

pytestmark = pytest.mark.slow

TINY_MODEL = {"stem_channels": [8, 16], "embed_dim": 16, "depth": 1, "heads": 2, "head_hidden": 16}
STUDIES, PER_STUDY, SEED = 12, 2, 7


@pytest.fixture
def cr_site(database_url, mosquitto_endpoint, site_on, tmp_path):  # the database outlives the site
    """A site whose store holds 24 CR instances of 12 patients, labelled and consented per
    the site's records, its catalog in SQLite and again in PostgreSQL; returns (site,
    token -> study)."""
    site = site_on(mosquitto_endpoint, cloud={"database": {"url": database_url}})
    site.enroll()
    sims = generate_studies("CR", STUDIES, seed=SEED, images_per_study=PER_STUDY)  # what send() sends
    pz = Pseudonymizer(site.secret, site.profile.deid.patient_id_issuer)
    rows = read_records_file(write_ground_truth(sims, tmp_path / "ehr.csv"))
    with RecordStore(site.profile.records.path) as records:
        records.upsert(pseudonymize(rows, pz))
    by_token = {pz.patient(st.patient.patient_id, st.patient.issuer): st for st in sims}
    site.coordinator.start()
    site.start_edge()
    _, result = site.send("CR", studies=STUDIES, seed=SEED, per_study=PER_STUDY)
    assert result.success == STUDIES * PER_STUDY, result.summary()
    assert site.settled(), site.agent.stats()
    site.stop_edge()
    return site, by_token


def test_store_training_decrypts_only_consented_images_audits_all_and_card_reproduces_input(
        cr_site, tmp_path, capsys):
    site, by_token = cr_site
    cluster, config = site.cluster, site.config
    catalog = site.coordinator.catalog
    entries = catalog.entries()
    assert len(entries) == STUDIES * PER_STUDY
    patient_of = {e.envelope_id: e.meta["patient_token"] for e in entries}
    refused = {t for t, st in by_token.items() if not st.consent["training"]}
    assert refused, "the seed must give a patient who refused training at acquisition"
    revoked = next(t for t, st in by_token.items() if st.consent["training"])

    # the patient withdraws consent for training after the images were registered
    with LedgerClient(cluster.genesis_path, SigningKey.load(cluster.key_path("operator")),
                      "operator") as operator:
        assert operator.submit(ConsentSet(revoked, "training", False, int(time.time() * 1000))).committed

    # the coordinator's configuration names the custodian's public key and socket, no private key
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in config.custodian_key.parent.glob("custodian*"))
    custodian_process = site.spawn_custodian()

    run = tmp_path / "run"
    t0 = time.perf_counter()
    rc = main(["cloud", "train", "--config", str(site.cloud_config_file()), "--modality", "CR",
               "--out", str(run), "--epochs", "3", "--model", json.dumps(TINY_MODEL),
               "--no-progress"])
    seconds = time.perf_counter() - t0
    captured = capsys.readouterr()
    printed = captured.out
    assert rc == 0, printed + captured.err
    assert seconds < 60, f"a demo-size store run took {seconds:.0f} s"
    print(f"cloud train on the store: {seconds:.1f} s")

    expect = {e for e, t in patient_of.items() if t not in refused and t != revoked}
    denied_refused = {e for e, t in patient_of.items() if t in refused}
    denied_revoked = {e for e, t in patient_of.items() if t == revoked}
    assert f"{len(entries)} requested, {len(expect)} granted" in printed
    assert f"{len(denied_revoked)} consent revoked" in printed

    # only the consented patients' images were used, and they are listed with their roots
    manifest = json.loads((run / "data_manifest.json").read_text())
    rows = {r[0]: r for r in manifest["images"]}
    assert set(rows) == expect
    for e in entries:
        if e.envelope_id in rows:
            assert rows[e.envelope_id][1] == e.merkle_root
            st = by_token[e.meta["patient_token"]]
            assert rows[e.envelope_id][2] == st.label  # labels joined by pseudonym
    report = json.loads((run / "access_report.json").read_text())
    assert report["granted"] == report["opened"] == len(expect)
    assert report["denied"] == {"no consent for purpose": len(denied_refused),
                                "consent revoked": len(denied_revoked)}
    assert {d[0] for d in report["denied_images"]} == denied_refused | denied_revoked

    # patient-level split: no patient in two splits
    split_of: dict[str, str] = {}
    for e, r in rows.items():
        assert split_of.setdefault(patient_of[e], r[3]) == r[3]
    assert set(split_of.values()) == {"train", "val", "test"}

    # every attempt is on the audit log, with the contract's decision, signed by f + 1
    with LedgerClient(cluster.genesis_path, SigningKey.load(cluster.key_path("training")),
                      "training") as training:
        audit = training.audit(user="training")
        by_image = {}
        for a in audit:
            by_image.setdefault(a["image"].hex(), []).append(a)
        for e in entries:
            (entry,) = by_image[e.envelope_id]
            assert entry["purpose"] == "training" and entry["action"] == "read"
            assert entry["granted"] == (e.envelope_id in expect)
            assert entry["reason"] == ("granted" if e.envelope_id in expect else
                                       "consent revoked" if e.envelope_id in denied_revoked else
                                       "no consent for purpose")
            assert entry["patient"] == patient_of[e.envelope_id]
            assert len(entry["signatures"]) >= 2

        # a granted image whose ciphertext is damaged in storage is counted, not half-used
        store = open_store(config.store_url)
        victim, intact = sorted(expect)[:2]
        pack = store._pack_key(store.get(victim).header.merkle_root)
        (store.root / pack).write_bytes(b"\0" * (store.root / pack).stat().st_size)
        custodian = Custodian(training, store, site.custodian, user="training")
        released, rep = custodian.release([catalog.get(victim), catalog.get(intact)], "training",
                                          names=["meta"])
        assert [r.entry.envelope_id for r in released] == [intact]
        assert rep.granted == 2 and sum(rep.unreadable.values()) == 1
        assert next(iter(rep.unreadable)) == "not readable from the store (ObjectStoreError)"  # chunk digest
        assert len(training.audit(user="training")) == len(audit) + 2

    # the run folder is the normal one
    for name in ("model.onnx", "model_card.json", "metrics.json", "results.md", "curves.png",
                 "confusion_matrix.png", "config.json"):
        assert (run / name).is_file(), name
    card = ModelCard.load(run / "model_card.json")
    card.check_model_file(run / "model.onnx")
    assert card.data["kind"] == "store"
    assert card.data["manifest_sha256"] == hashlib.sha256(canonical_bytes(manifest)).hexdigest()
    assert json.loads((run / "metrics.json").read_text())["parity"]["n"] > 0

    # the card's chain, run on the raw DICOM's modality values, is what training saw
    config_json = json.loads((run / "config.json").read_text())
    prefix_len = len(config_json["prefix"]["transforms"])
    fitted = from_config(config_json["fitted"])
    chain = card.preprocessing_chain()
    edge_part = Compose(chain.transforms[:prefix_len])
    device = site.device_key.public
    import onnxruntime as ort

    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    for envelope_id in sorted(expect - {victim})[:3]:
        parts = open_envelope(store.get(envelope_id), site.custodian, device)
        values = modality_values(pydicom.dcmread(io.BytesIO(parts["dicom"])))
        tensor = np.load(io.BytesIO(parts["tensor"]))
        frame = rows[envelope_id][4]
        stored = tensor[len(tensor) // 2, 0]
        np.testing.assert_array_equal(np.squeeze(edge_part(values[frame])), stored)
        model_input = chain(values[frame])
        np.testing.assert_array_equal(model_input, fitted(stored))
        assert model_input.shape == tuple(card.input_shape)
        (probs,) = session.run(None, {session.get_inputs()[0].name: model_input[None]})
        assert probs.shape == (1, card.num_classes) and np.isclose(probs.sum(), 1, atol=1e-4)

    # --max-images stops asking once it has enough; nothing left to train on is an error
    few = gather(config, "CR", max_images=6)
    assert sum(len(s) for s in few.source.splits.values()) == 6
    assert few.report.requested < len(entries)
    with pytest.raises(TrainingDataError, match="no MR image"):
        gather(config, "MR")

    # without the custodian process, the training service decrypts nothing: it holds no key
    custodian_process.terminate()
    assert custodian_process.wait(20) == 0
    with pytest.raises(CustodianError, match="not reachable"):
        gather(config, "CR", max_images=2)
