"""The de-identification core, hammered with generated datasets (hypothesis).

Datasets are built from attributes the profile lists (every VR we can generate), unlisted
harmless ones, unlisted names/dates/UIDs, private blocks, overlays and curves, nested in
sequences up to four deep. Identifying values carry unique markers, so "nothing survives"
is a byte search in the encoded output.
"""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.datadict import DicomDictionary, dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from edge_agent.annex_e import RULES
from edge_agent.deid import CLASS_UID_TAGS, DeidOptions, deidentify, resolve_action
from edge_agent.pseudonyms import Pseudonymizer

PZ = Pseudonymizer(bytes(range(32)), "site-a")
TEXT_VRS = {"PN", "LO", "SH", "LT", "ST", "UT", "UC", "CS", "AE"}
GENERATABLE = TEXT_VRS | {"DA", "TM", "DT", "UI", "SQ", "AS", "IS", "DS"}
LISTED = sorted(tag for tag, rule in RULES.items()
                if tag >> 16 not in (0x0000, 0x0002, 0x0004) and tag != 0xFFFCFFFC
                and dictionary_VR(tag) in GENERATABLE)
LISTED_SQ = [t for t in LISTED if dictionary_VR(t) == "SQ"]
LISTED_LEAF = [t for t in LISTED if dictionary_VR(t) != "SQ"]
# unlisted attributes that carry no identity: kept as they are
SAFE = [(0x00080060, "CS", "CT"), (0x00180050, "DS", "2.5"), (0x00280010, "US", 512),
        (0x00180015, "CS", "CHEST"), (0x00200011, "IS", "3")]
UNLISTED_PN = next(t for t, v in sorted(DicomDictionary.items()) if v[0] == "PN" and t not in RULES
                   and t >> 16 != 0x0002)
UNLISTED_UI = next(t for t, v in sorted(DicomDictionary.items()) if v[0] == "UI" and t not in RULES
                   and t >> 16 == 0x0020 and t not in CLASS_UID_TAGS)
UNLISTED_SQ = [0x00081115, 0x00400260, 0x00089215]  # Referenced Series, Performed Protocol Code, Derivation Code


class Markers:
    """Unique identifying values, remembered so the test can look for them afterwards."""

    def __init__(self) -> None:
        self.n = 0

    def text(self) -> str:
        self.n += 1
        return f"PHI{self.n:05d}X"

    def uid(self) -> str:
        self.n += 1
        return f"1.3.6.1.4.1.99999.{self.n}.7"


def _value(vr: str, m: Markers):
    if vr in ("PN", "LO", "SH", "LT", "ST", "UT", "UC"):
        return m.text()
    if vr in ("CS", "AE"):
        return m.text()[:16]
    if vr == "DA":
        return "20190611"
    if vr == "TM":
        return "101112"
    if vr == "DT":
        return "20190611101112"
    if vr == "UI":
        return m.uid()
    if vr == "AS":
        return "042Y"
    return "7"


@st.composite
def datasets(draw, depth: int = 0, markers: Markers | None = None) -> Dataset:
    m = markers if markers is not None else Markers()
    ds = Dataset()
    for tag in draw(st.lists(st.sampled_from(LISTED_LEAF), max_size=12, unique=True)):
        ds.add(DataElement(tag, dictionary_VR(tag), _value(dictionary_VR(tag), m)))
    for tag, vr, value in draw(st.lists(st.sampled_from(SAFE), max_size=3, unique=True)):
        ds.add(DataElement(tag, vr, value))
    if draw(st.booleans()):  # an unlisted name and an unlisted instance UID
        ds.add(DataElement(UNLISTED_PN, "PN", m.text()))
        ds.add(DataElement(UNLISTED_UI, "UI", m.uid()))
    if draw(st.booleans()):
        block = ds.private_block(0x0029, "VENDOR X", create=True)
        block.add_new(0x10, "LO", m.text())
    if draw(st.booleans()):
        ds.add(DataElement(0x60000022, "LO", m.text()))  # overlay description
        ds.add(DataElement(0x50000030, "SH", m.text()))  # curve axis units
    if depth < 4:
        for tag in draw(st.lists(st.sampled_from(LISTED_SQ + UNLISTED_SQ), max_size=2, unique=True)):
            items = [draw(datasets(depth + 1, m)) for _ in range(draw(st.integers(1, 2)))]
            ds.add(DataElement(tag, "SQ", Sequence(items)))
    return ds


def _encode(ds: Dataset) -> bytes:
    ds = ds.copy()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=False)
    return buf.getvalue()


def _walk(ds: Dataset, path=()):
    for elem in ds:
        here = path + (int(elem.tag),)
        yield here, elem
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                yield from _walk(item, here + (i,))


def _identifying(ds: Dataset, options: DeidOptions) -> set[str]:
    """Marker values the output must not contain: every listed attribute whose action is not
    keep, every unlisted name, every private/overlay/curve value."""
    found = set()
    for _, elem in _walk(ds):
        tag = int(elem.tag)
        value = elem.value
        if elem.VR == "SQ" or not isinstance(value, str) or not value.startswith(("PHI", "1.3.6.1.4.1.99999")):
            continue
        rule = RULES.get(tag)
        if rule is not None and resolve_action(rule, elem.VR, options) in ("K", "KSQ", "C"):
            continue
        found.add(value)
    return found


OPTIONS = st.builds(DeidOptions, st.booleans(), st.booleans())


@settings(max_examples=60)
@given(datasets(), OPTIONS)
def test_no_identifying_value_survives_at_any_depth(ds, options):
    original = _encode(ds)
    out, report = deidentify(ds, PZ, options)
    data = _encode(out)
    for value in _identifying(ds, options):
        assert value.encode() not in data, value
    assert _encode(ds) == original  # the input is left untouched
    # no value reaches the report either
    text = json.dumps(report.to_dict())
    assert "PHI" not in text and "99999" not in text
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"


@settings(max_examples=60)
@given(datasets())
def test_listed_attributes_get_their_action(ds):
    options = DeidOptions()
    out, _ = deidentify(ds, PZ, options)
    out_elems = dict(_walk(out))
    for path, elem in _walk(ds):
        rule = RULES.get(int(elem.tag))
        if rule is None or (len(path) > 1 and any(isinstance(p, int) and p > 0xFFFF and RULES.get(p) and
                                                   resolve_action(RULES[p], "SQ", options) in ("X", "Z", "D")
                                                   for p in path[:-1])):
            continue  # parent sequence removed, emptied or replaced: checked at the parent
        action = resolve_action(rule, elem.VR, options)
        got = out_elems.get(path)
        if int(elem.tag) in (0x00100020, 0x00080050):  # patient ID, accession: keyed pseudonyms
            assert got is not None and got.value != elem.value
        elif action == "X":
            assert got is None, (path, rule.name)
        elif action == "Z":
            assert got is not None and not got.value, (path, rule.name)
        elif action == "D":
            assert got is not None and got.value and got.value != elem.value, (path, rule.name)
        elif action == "U" and elem.VR == "UI":
            assert got is not None and got.value == PZ.uid(elem.value), (path, rule.name)


@settings(max_examples=60)
@given(datasets())
def test_idempotent_in_what_it_removes_and_keeps(ds):
    once, _ = deidentify(ds, PZ, DeidOptions())
    twice, report = deidentify(once, PZ, DeidOptions())
    first, second = dict(_walk(once)), dict(_walk(twice))
    assert set(first) == set(second)  # nothing more to remove, nothing added back
    for path, elem in first.items():
        if elem.VR in ("UI", "SQ") or int(elem.tag) in (0x00100020, 0x00080050):
            continue  # pseudonyms chain on purpose: a token of a token
        assert second[path].value == elem.value, path
    assert report.private_removed == report.overlays_removed == report.curves_removed == 0


VALID_UIDS = st.lists(st.integers(1, 10**12), min_size=1, max_size=8).map(lambda p: "1.2." + ".".join(map(str, p)))


@given(st.lists(VALID_UIDS, min_size=2, max_size=6, unique=True))
def test_uid_mapping_is_consistent_across_places_and_instances(uids):
    def instance(ref_uid: str) -> Dataset:
        ds = Dataset()
        ds.SOPInstanceUID = uids[0]
        ds.StudyInstanceUID = uids[1]
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedSOPInstanceUID = ref_uid
        inner = Dataset()
        inner.ReferencedSOPInstanceUID = uids[0]
        item.ReferencedImageSequence = Sequence([inner])
        ds.SourceImageSequence = Sequence([item])
        return ds

    a, _ = deidentify(instance(uids[-1]), PZ)
    b, _ = deidentify(instance(uids[0]), PZ)
    assert a.SOPInstanceUID == b.SOPInstanceUID == PZ.uid(uids[0])
    assert a.StudyInstanceUID == b.StudyInstanceUID != a.SOPInstanceUID
    # a reference to the instance itself, however deep, points at its new UID
    assert a.SourceImageSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    assert b.SourceImageSequence[0].ReferencedSOPInstanceUID == b.SOPInstanceUID
    assert a.SourceImageSequence[0].ReferencedSOPInstanceUID != a.SOPInstanceUID
    # class UIDs are not identities: kept
    assert a.SourceImageSequence[0].ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    new = [PZ.uid(u) for u in uids]
    assert len(set(new)) == len(uids)
    assert all(u.startswith("2.25.") and len(u) <= 64 for u in new)


@given(datasets(), OPTIONS)
def test_deterministic(ds, options):
    a, ra = deidentify(ds, PZ, options)
    b, rb = deidentify(ds, PZ, options)
    assert _encode(a) == _encode(b) and ra == rb


def test_patient_token_accession_and_dates(pz):
    ds = Dataset()
    ds.PatientID, ds.IssuerOfPatientID, ds.PatientName = "MRN1234567 ", "site-a", "Doe^Jane"
    ds.AccessionNumber = "ACC42"
    ds.StudyDate, ds.StudyTime, ds.InstanceCreationDate = "20240304", "081500", "20240304"
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge, ds.PatientWeight = "19700101", "F", "054Y", "70"
    ds.PerformedProcedureStepStartDateTime = "20240304081500.123+0100"  # listed DT, shifted
    ds.add_new(0x00181012, "DA", "20240304")  # Date of Secondary Capture: unlisted, same treatment

    out, report = deidentify(ds, pz, DeidOptions())
    assert out.PatientID == report.patient_token == pz.patient("MRN1234567") and len(out.PatientID) == 64
    assert "IssuerOfPatientID" not in out and not out.PatientName
    assert out.AccessionNumber == report.accession_pseudonym == pz.accession("ACC42")
    assert not out.StudyDate and "InstanceCreationDate" not in out and "PatientAge" not in out
    assert out.LongitudinalTemporalInformationModified == "REMOVED"

    out, report = deidentify(ds, pz, DeidOptions(retain_longitudinal_modified_dates=True,
                                                retain_patient_characteristics=True))
    shift = pz.date_shift(report.patient_token)
    assert report.date_shift_days == shift and 1 <= shift <= 3650
    import datetime as dt

    expected = (dt.date(2024, 3, 4) - dt.timedelta(days=shift)).strftime("%Y%m%d")
    assert out.StudyDate == out.InstanceCreationDate == out[0x00181012].value == expected
    assert out.StudyTime == "081500"  # times of day survive a whole-day shift
    assert out.PerformedProcedureStepStartDateTime == expected + "081500.123+0100"
    assert out.PatientSex == "F" and out.PatientAge == "054Y" and out.PatientWeight == 70
    assert not out.PatientBirthDate  # not retained by either option
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == ["113100", "113107", "113108"]


def test_no_patient_id_gets_a_per_study_token(pz):
    a, b = Dataset(), Dataset()
    a.StudyInstanceUID, b.StudyInstanceUID = "1.2.3", "1.2.4"
    (oa, ra), (ob, rb) = deidentify(a, pz), deidentify(b, pz)
    assert ra.patient_id_missing and ra.patient_token != rb.patient_token
    assert oa.PatientID == ra.patient_token


def test_undecodable_element_is_refused_by_tag_without_value(pz):
    from pydicom import dcmread

    ds = Dataset()
    ds.PatientID = "X"
    bad = b"\x28\x00\x10\x00US\x01\x00\x01"  # (0028,0010) Rows: one byte where US needs two
    read = dcmread(io.BytesIO(_encode(ds) + bad), force=True)
    from edge_agent.errors import DeidError

    with pytest.raises(DeidError, match=r"\(0028,0010\)"):
        deidentify(read, pz)


def _values(ds: Dataset) -> dict:
    return {path: (elem.VR, elem.value) for path, elem in _walk(ds) if elem.VR != "SQ"}


@settings(max_examples=40)
@given(datasets(), OPTIONS)
def test_a_parsed_stream_gets_the_same_result_as_the_dataset_it_encodes(ds, options):
    """Unlisted elements of a parsed stream pass through undecoded: the result must match the
    element-by-element path, value for value, at every depth."""
    from pydicom import dcmread

    a, ra = deidentify(dcmread(io.BytesIO(_encode(ds)), force=True), PZ, options)
    fresh, rf = deidentify(ds, PZ, options)
    assert ra == rf
    reread = dcmread(io.BytesIO(_encode(a)), force=True)
    assert _values(reread) == _values(dcmread(io.BytesIO(_encode(fresh)), force=True))


def test_unlisted_elements_are_kept_byte_for_byte_and_bad_lengths_refused_at_depth(pz):
    from pydicom import dcmread

    from edge_agent.errors import DeidError

    ds = Dataset()
    ds.PatientID, ds.Manufacturer, ds.Rows = "X", "ACME  MODEL^7", 512
    item = Dataset()
    item.add_new(0x00280011, "US", 256)
    ds.add_new(0x00081115, "SQ", Sequence([item]))  # Referenced Series Sequence: unlisted, cleaned inside
    raw = _encode(ds)
    out, _ = deidentify(dcmread(io.BytesIO(raw), force=True), pz)
    encoded = _encode(out)
    assert b"ACME  MODEL^7" in encoded and out.Rows == 512 and out[0x00081115][0].Columns == 256
    # (0028,0011) Columns inside the item: three bytes where US needs a multiple of two
    at = raw.index(b"\x28\x00\x11\x00US\x02\x00")
    bad = raw[:at] + b"\x28\x00\x11\x00US\x03\x00\x00\x01" + raw[at + 10:]
    parsed = dcmread(io.BytesIO(bad), force=True)
    with pytest.raises(DeidError, match=r"\(0028,0011\)") as info:
        deidentify(parsed, pz)
    assert "256" not in str(info.value)
