"""Clinical records: CSV/JSON in, pseudonymized keys out, joinable with de-identified images."""

from __future__ import annotations

import json

import pytest
from pydicom.dataset import Dataset

from edge_agent.deid import deidentify
from edge_agent.errors import RecordsError
from edge_agent.records import RecordStore, parse_records, pseudonymize, read_records_file

CSV = """patient_id,issuer,accession,label,consent_diagnosis,consent_research,consent_training,consent_sharing
MRN0001,site-a,ACC1,malignant,yes,yes,no,no
MRN0002,,ACC2,healthy,true,false,1,0
"""


def test_csv_and_json_give_the_same_records(pz, tmp_path):
    rows_csv = parse_records(CSV, fmt="csv")
    doc = {"records": [
        {"patient_id": "MRN0001", "issuer": "site-a", "accession": "ACC1", "label": "Malignant",
         "consent": {"diagnosis": True, "research": True, "training": False, "sharing": False}},
        {"patient_id": " MRN0002 ", "accession": "ACC2", "label": "healthy", "consent_diagnosis": "y",
         "consent_research": "n", "consent_training": 1, "consent_sharing": 0}]}
    rows_json = parse_records(json.dumps(doc), fmt="json")
    assert pseudonymize(rows_csv, pz) == pseudonymize(rows_json, pz)
    (tmp_path / "r.csv").write_text(CSV)
    assert pseudonymize(read_records_file(tmp_path / "r.csv"), pz) == pseudonymize(rows_csv, pz)


def test_labels_join_images_by_pseudonym_and_no_identifier_is_stored(pz, tmp_path):
    records = pseudonymize(parse_records(CSV, fmt="csv"), pz)
    with RecordStore(tmp_path / "rec.sqlite") as store:
        assert store.upsert(records) == 2
        ds = Dataset()
        ds.PatientID, ds.IssuerOfPatientID, ds.AccessionNumber = "MRN0001", "site-a", "ACC1"
        _, report = deidentify(ds, pz)
        assert store.label(report.patient_token, report.accession_pseudonym) == "malignant"
        assert store.consent(report.patient_token) == {"diagnosis": True, "research": True,
                                                       "training": False, "sharing": False}
        other = deidentify(_ds("MRN0002", "ACC2"), pz)[1]
        assert store.labels(other.patient_token) == {other.accession_pseudonym: "healthy"}
        assert store.counts() == {"patients": 2, "studies": 2}
    raw = (tmp_path / "rec.sqlite").read_bytes()
    assert b"MRN0001" not in raw and b"ACC1" not in raw


def _ds(pid, acc):
    ds = Dataset()
    ds.PatientID, ds.AccessionNumber = pid, acc
    return ds


@pytest.mark.parametrize("text, fmt, message", [
    ("patient_id,accession\nMRN9,ACC9\n", "csv", "CSV header lacks label"),
    (CSV.replace("malignant", "unknown"), "csv", r"line 2: label must be one of healthy, benign, malignant"),
    (CSV.replace("MRN0001", ""), "csv", r"line 2: field 'patient_id' missing"),
    (CSV.replace(",yes,yes,no,no", ",yes,maybe,no,no"), "csv", r"consent_research: expected a boolean"),
    ('[{"patient_id": "MRN7", "accession": "A", "label": "benign"}]', "json", "consent for 'diagnosis' missing"),
    ("{not json", "json", "not valid JSON"),
    ('{"rows": []}', "json", "expected a list of records"),
    ("x", "xml", "unknown format"),
])
def test_bad_input_is_named_without_values(text, fmt, message):
    with pytest.raises(RecordsError, match=message) as err:
        parse_records(text, fmt=fmt, origin="export")
    assert "MRN" not in str(err.value) and "ACC" not in str(err.value)
