"""Simulated studies: deterministic, realistic headers with fake PHI, labelled lesions, and
a ground truth the clinical-records importer reads."""

from __future__ import annotations

import io

import numpy as np
import pytest
from pydicom import dcmread

from edge_agent.deid import deidentify
from edge_agent.pseudonyms import Pseudonymizer
from edge_agent.records import RecordStore, pseudonymize, read_records_file
from scanner_sim import phantoms
from scanner_sim.studies import MODALITIES, generate_studies, part10_bytes, write_ground_truth, write_studies

PZ = Pseudonymizer(bytes(range(32)), "site-a")


@pytest.mark.parametrize("modality", MODALITIES)
def test_each_modality_is_valid_dicom_with_fake_phi(modality):
    [study] = generate_studies(modality, 1, seed=1)
    for ds in study.datasets:
        back = dcmread(io.BytesIO(part10_bytes(ds)))
        assert back.Modality == modality and back.PatientName == study.patient.name
        assert back.PatientID == study.patient.patient_id and back.AccessionNumber == study.accession
        assert back.StudyInstanceUID == study.study_uid and back[0x00291010].value  # vendor private block
        pixels = back.pixel_array
        if modality == "US":
            assert pixels.ndim == 4 and pixels.shape[-1] == 3 and back.NumberOfFrames == pixels.shape[0]
        else:
            assert pixels.ndim == 2
    if modality == "CT":
        ct = study.datasets[0]
        assert (ct.Rows, ct.Columns, ct.BitsAllocated, ct.RescaleIntercept) == (512, 512, 16, -1024)
        hu = ct.pixel_array.astype(float) * ct.RescaleSlope + ct.RescaleIntercept
        assert hu.min() < -900 and 0 < np.median(hu[200:300, 200:300]) + 1000


def test_same_seed_same_studies_other_seed_other_studies():
    a = generate_studies("CT", 2, seed=5)
    b = generate_studies("CT", 2, seed=5)
    c = generate_studies("CT", 2, seed=6)
    assert [part10_bytes(ds) for st in a for ds in st.datasets] == [part10_bytes(ds) for st in b for ds in st.datasets]
    assert a[0].patient != c[0].patient and a[0].study_uid != c[0].study_uid


def test_lesions_differ_by_label():
    rng = np.random.default_rng(0)
    assert not phantoms.lesion_mask(128, 128, "healthy", rng).any()
    benign = phantoms.lesion_mask(256, 256, "benign", np.random.default_rng(1), centre=(0, 0), radius=0.1)
    malignant = phantoms.lesion_mask(256, 256, "malignant", np.random.default_rng(1), centre=(0, 0), radius=0.1)

    def roughness(mask):  # perimeter^2 / area: 4*pi for a disc, larger for a spiculated border
        solid = mask > 0.5
        edge = solid ^ np.roll(solid, 1, 0) | solid ^ np.roll(solid, 1, 1)
        return edge.sum() ** 2 / solid.sum()

    assert roughness(malignant) > 1.5 * roughness(benign)


def test_ground_truth_joins_deidentified_images(tmp_path):
    studies = generate_studies("MR", 3, seed=9) + generate_studies("CR", 2, seed=9)
    for suffix in ("csv", "json"):
        path = write_ground_truth(studies, tmp_path / f"truth.{suffix}")
        records = pseudonymize(read_records_file(path), PZ)
        with RecordStore(tmp_path / f"rec-{suffix}.sqlite") as store:
            store.upsert(records)
            for st in studies:
                _, report = deidentify(st.datasets[0], PZ)
                assert store.label(report.patient_token, report.accession_pseudonym) == st.label
                assert store.consent(report.patient_token) == dict(st.consent)
    files = write_studies(studies, tmp_path / "dicom")
    assert len(files) == sum(len(st.datasets) for st in studies) and all(f.stat().st_size > 1000 for f in files)


def test_unknown_modality_is_refused():
    with pytest.raises(ValueError, match="unknown modality"):
        generate_studies("PET", 1)
