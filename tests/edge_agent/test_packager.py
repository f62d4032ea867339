"""The packager sink: real de-identified instances in, sealed envelopes in the outbox out."""

import io
import json

import numpy as np
import pytest

from edge_agent.outbox import Outbox
from edge_agent.packager import Packager
from edge_agent.processor import Processor
from edge_agent.pseudonyms import Pseudonymizer
from edge_agent.records import RecordStore, parse_records, pseudonymize
from edge_agent.config import BurnedInPolicy
from edge_agent.deid import DeidOptions
from medchain.identity import RecipientKey, SigningKey
from medchain.protocol import Envelope, decode_message
from medchain.sealing import open_envelope, open_meta
from models.modality import config_for
from scanner_sim.studies import generate_studies, ground_truth, part10_bytes

SECRET = b"s" * 32
DEVICE, CUSTODIAN, META = SigningKey.generate(), RecipientKey.generate(), RecipientKey.generate()


@pytest.fixture
def processor():
    policy = BurnedInPolicy("blank", (), ("SC", "XA", "ES", "OT"))
    return Processor(Pseudonymizer(SECRET, "site-a"), DeidOptions(True, False), policy)


@pytest.fixture
def records(tmp_path):
    return RecordStore(tmp_path / "records.sqlite")


def packager(tmp_path, records=None, **kw):
    box = Outbox(tmp_path / "outbox.sqlite")
    return Packager(box, device_id="edge-1", device_key=DEVICE, custodian=CUSTODIAN.public,
                    meta_key=META.public, preprocess={"CT": config_for("CT", size=64)}, records=records, **kw), box


def opened(box):
    (entry,) = box.pending(10)
    env = decode_message(entry.data, expect=Envelope)
    return env, open_envelope(env, CUSTODIAN, DEVICE.public)


def test_ct_instance_becomes_one_sealed_envelope(tmp_path, processor, records):
    study = generate_studies("CT", 1, seed=3, images_per_study=1)[0]
    rows = parse_records(json.dumps(ground_truth([study])), fmt="json")
    records.upsert(pseudonymize(rows, Pseudonymizer(SECRET, "site-a")))
    instance = processor.process(part10_bytes(study.datasets[0]), "spool-1")
    pk, box = packager(tmp_path, records)
    pk.accept(instance)
    env, parts = opened(box)
    assert env.header.sequence == 1 and env.header.device_id == "edge-1"
    assert parts["dicom"] == instance.dicom  # the de-identified file, losslessly
    tensor = np.load(io.BytesIO(parts["tensor"]))
    assert tensor.shape == (1, 1, 64, 64) and tensor.dtype == np.float32
    meta = json.loads(parts["meta"])
    assert meta["label"] == study.label and meta["consent"] == dict(study.consent)
    assert meta["calibration"]["RescaleIntercept"] == float(study.datasets[0].RescaleIntercept)
    assert meta["resolution"] == {"rows": 512, "columns": 512, "frames": 1}
    assert meta["modality_config"]["size"] == 64 and len(meta["descriptors"]["wavelet"]) == 7
    assert meta["preprocess"]["transforms"][1] == {"name": "Resize", "height": 64, "width": 64,
                                                   "interpolation": "bilinear"}
    header = open_meta(env.header, META)  # what ingest reads
    assert header["patient_token"] == instance.patient_token and header["consent"] == dict(study.consent)
    assert "label" not in header  # the diagnosis stays with the custodian
    (entry,) = box.pending(10)
    for clinical in (instance.patient_token, instance.sop_instance_uid, instance.study_uid, "consent"):
        assert clinical.encode() not in entry.data  # nothing of it in clear text on the broker
    for value in (study.patient.patient_id, study.patient.name, study.accession):
        assert value.encode() not in parts["meta"] and value.encode() not in parts["dicom"]


def test_redelivery_after_a_crash_is_not_a_second_envelope(tmp_path, processor):
    study = generate_studies("MR", 1, seed=4, images_per_study=1)[0]
    instance = processor.process(part10_bytes(study.datasets[0]), "spool-1")
    pk, box = packager(tmp_path)
    pk.accept(instance)
    pk.accept(instance)
    assert box.depth == 1 and pk.stats.redelivered == 1
    box.release(box.envelope_ids()[0])
    pk.accept(instance)
    assert box.depth == 0


def test_cine_ultrasound_keeps_distinct_frames(tmp_path, processor):
    study = generate_studies("US", 1, seed=5, images_per_study=1)[0]
    ds = study.datasets[0]
    ds.BurnedInAnnotation = "NO"
    instance = processor.process(part10_bytes(ds), "spool-1")
    pk, box = packager(tmp_path)
    pk.accept(instance)
    _, parts = opened(box)
    meta = json.loads(parts["meta"])
    tensor = np.load(io.BytesIO(parts["tensor"]))
    assert int(ds.NumberOfFrames) > 1 and tensor.shape[0] == len(meta["kept_frames"]) >= 1


def test_instance_without_pixels_travels_without_a_tensor(tmp_path, processor):
    from pydicom.data import get_testdata_file

    raw = open(get_testdata_file("test-SR.dcm"), "rb").read()
    instance = processor.process(raw, "spool-1")
    pk, box = packager(tmp_path)
    pk.accept(instance)
    env, parts = opened(box)
    assert set(parts) == {"dicom", "meta"} and open_meta(env.header, META)["has_tensor"] is False


def test_backpressure_reports_a_full_outbox(tmp_path):
    from edge_agent.outbox import OutboxLimits

    box = Outbox(tmp_path / "o.sqlite", OutboxLimits(max_count=0))
    pk = Packager(box, device_id="edge-1", device_key=DEVICE, custodian=CUSTODIAN.public,
                  meta_key=META.public)
    assert "limit 0" in pk.backpressure()


def test_prediction_travels_sealed_in_the_signed_header_and_a_failing_model_holds_nothing_back(
        tmp_path, processor):
    study = generate_studies("CT", 1, seed=4, images_per_study=1)[0]
    instance = processor.process(part10_bytes(study.datasets[0]), "spool-1")
    seen = []

    def predict(modality, frame):
        seen.append((modality, frame.shape, float(frame.min())))
        return {"label": 0, "class_name": "healthy", "probabilities": [0.9, 0.1],
                "model_version": "hybrid-x", "model_hash": "ab" * 32}

    pk, box = packager(tmp_path, predict=predict)
    pk.accept(instance)
    env, parts = opened(box)
    assert seen == [("CT", (512, 512), seen[0][2])] and seen[0][2] < -500  # HU, not stored values
    assert open_meta(env.header, META)["prediction"]["class_name"] == "healthy"
    assert json.loads(parts["meta"])["prediction"] == open_meta(env.header, META)["prediction"]
    assert pk.stats.predicted == 1

    def broken(modality, frame):
        raise RuntimeError("onnxruntime fell over")

    pk2, box2 = packager(tmp_path / "b", predict=broken)
    pk2.accept(instance)
    env, parts = opened(box2)  # the image still goes out, without a prediction
    assert "prediction" not in open_meta(env.header, META)
    assert json.loads(parts["meta"])["prediction_error"] == "RuntimeError"
    assert pk2.stats.prediction_failed == 1


def test_preparation_beside_deidentification_is_the_packagers_own(tmp_path, processor):
    """The node's worker prepares from the dataset it just de-identified; the packager, given
    an instance without that, prepares from the file: the same parts and header either way."""
    from dataclasses import replace

    study = generate_studies("CT", 1, seed=6, images_per_study=1)[0]
    instance, ds = processor.process_keeping_dataset(part10_bytes(study.datasets[0]), "spool-1")
    pk, _ = packager(tmp_path)
    prepared = replace(instance, preparation=pk.preparer.prepare(ds, instance.modality))
    assert prepared.preparation.tensor is not None and prepared.preparation.error is None
    assert pk.build(prepared) == pk.build(instance)
    assert prepared.preparation.record["modality_config"]["size"] == 64  # the profile's config


def test_pixels_that_cannot_be_prepared_still_travel_losslessly(tmp_path, processor):
    from dataclasses import replace

    study = generate_studies("CT", 1, seed=7, images_per_study=1)[0]
    instance, ds = processor.process_keeping_dataset(part10_bytes(study.datasets[0]), "spool-1")
    ds.PixelData = ds.PixelData[:100]  # shorter than its geometry: no values can be read
    pk, box = packager(tmp_path)
    preparation = pk.preparer.prepare(ds, instance.modality)
    assert preparation.tensor is None and preparation.error
    pk.accept(replace(instance, preparation=preparation))
    env, parts = opened(box)
    assert set(parts) == {"dicom", "meta"} and parts["dicom"] == instance.dicom
    assert json.loads(parts["meta"])["preprocess_error"] == preparation.error
    assert open_meta(env.header, META)["has_tensor"] is False and pk.stats.without_tensor == 1


def test_the_frame_for_a_model_is_decoded_only_when_one_serves_the_modality(tmp_path, processor):
    study = generate_studies("CT", 1, seed=8, images_per_study=1)[0]
    instance = processor.process(part10_bytes(study.datasets[0]), "spool-1")
    asked = []
    pk, box = packager(tmp_path, predict=lambda m, f: asked.append(m), serves=lambda m: m == "MR")
    pk.accept(instance)
    env, _ = opened(box)
    assert asked == [] and "prediction" not in open_meta(env.header, META)
