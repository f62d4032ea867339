"""The de-identification core, hammered with generated datasets (hypothesis).

Datasets are drawn from the whole pydicom dictionary (every VR, retired attributes
included), Table E.1-1's rows and the keep list, plus public tags no dictionary knows,
UN-typed elements, private blocks, overlays and curves, nested in sequences three deep. Every
value is a unique marker, so "nothing outside the allow-list survives" is a byte search in
the encoded output.
"""

from __future__ import annotations

import io
import json
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.datadict import DicomDictionary
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from edge_agent.annex_e import RULES
from edge_agent.deid import DeidOptions, deidentify, resolve_action
from edge_agent.errors import DeidError
from edge_agent.keep_list import KEEP
from edge_agent.pseudonyms import Pseudonymizer

PZ = Pseudonymizer(bytes(range(32)), "site-a")
# what the profile itself writes into every output
ADDED = {0x00100020, 0x00120062, 0x00120063, 0x00120064, 0x00280303}
_SKIP_GROUPS = (0x0000, 0x0002, 0x0004, 0xFFFC, 0xFFFA)


def _vr(tag: int) -> str:
    return DicomDictionary[tag][0].split(" or ")[0]


def _usable(tag: int) -> bool:
    return (tag >> 16 not in _SKIP_GROUPS and tag not in (0x00080005, 0x00100020, 0x00080050)
            and _vr(tag) not in ("NONE", "UN"))


DICT = sorted(t for t in DicomDictionary if _usable(t))
LISTED = [t for t in sorted(RULES) if t in DicomDictionary and _usable(t)]
KEPT = [t for t in sorted(KEEP) if _usable(t)]
LEAVES = {name: [t for t in tags if _vr(t) != "SQ"] for name, tags in
          (("dict", DICT), ("listed", LISTED), ("kept", KEPT))}
SEQUENCES = sorted({t for tags in (DICT, LISTED, KEPT) for t in tags if _vr(t) == "SQ"})
UNKNOWN_PUBLIC = [0x00701234, 0x00185555, 0x00200099]  # even groups, in no dictionary


class Markers:
    """Unique values, remembered with whether they may survive."""

    def __init__(self) -> None:
        self.n = 0

    def next(self) -> int:
        self.n += 1
        return self.n


def _value(vr: str, n: int):
    """A value of ``vr`` carrying marker ``n``, and the bytes to search for (None: the value
    is too short to be told apart from other bytes; it is checked by path instead)."""
    text = f"PHI{n:05d}X"
    if vr in ("PN", "LO", "SH", "LT", "ST", "UT", "UC", "CS", "AE"):
        return text, text.encode()
    if vr == "UI":
        uid = f"1.3.6.1.4.1.99999.{n}.7"
        return uid, uid.encode()
    if vr == "DA":
        return f"1950{1 + n % 12:02d}{1 + n % 28:02d}", None
    if vr == "TM":
        value = f"101112.{n:06d}"
        return value, value.encode()
    if vr == "DT":
        value = f"19500101101112.{n:06d}+0100"
        return value, value.encode()
    if vr == "IS":
        value = f"99{n:06d}"
        return value, value.encode()
    if vr == "DS":
        value = f"77{n:05d}.5"
        return value, value.encode()
    if vr == "AS":
        return "042Y", None
    if vr in ("UL", "SL"):
        return 0x5A5A0000 + n, struct.pack("<I", 0x5A5A0000 + n)
    if vr in ("UV", "SV"):
        return 0x5A5A5A5A00000000 + n, struct.pack("<Q", 0x5A5A5A5A00000000 + n)
    if vr == "FD":
        return 12345.0 + n / 1e6, struct.pack("<d", 12345.0 + n / 1e6)
    if vr in ("US", "SS", "FL", "AT"):
        return (n % 30000) + 1 if vr != "FL" else float(n), None
    if vr == "UR":
        value = f"http://phi.example/{n:05d}"
        return value, value.encode()
    blob = f"PHIBIN{n:05d}X".encode().ljust(16, b"\x00")  # OB OW OF OD OL OV UN
    return blob, blob[:12]


@st.composite
def datasets(draw, depth: int = 0, m: Markers | None = None) -> Dataset:
    m = m if m is not None else Markers()
    ds = Dataset()
    pools = st.sampled_from(LEAVES["dict"]) | st.sampled_from(LEAVES["listed"]) | st.sampled_from(LEAVES["kept"])
    for tag in draw(st.lists(pools, max_size=14, unique=True)):
        ds.add(DataElement(tag, _vr(tag), _value(_vr(tag), m.next())[0]))
    if draw(st.booleans()):  # a public tag nobody knows, so UN
        ds.add(DataElement(draw(st.sampled_from(UNKNOWN_PUBLIC)), "UN", _value("UN", m.next())[0]))
    if draw(st.booleans()):
        block = ds.private_block(0x0029, "VENDOR X", create=True)
        block.add_new(0x10, "LO", _value("LO", m.next())[0])
        block.add_new(0x11, "OB", _value("OB", m.next())[0])
    if draw(st.booleans()):
        ds.add(DataElement(0x60000022, "LO", _value("LO", m.next())[0]))  # overlay description
        ds.add(DataElement(0x50000030, "SH", _value("SH", m.next())[0]))  # curve axis units
    if depth < 3:
        for tag in draw(st.lists(st.sampled_from(SEQUENCES), max_size=2, unique=True)):
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


def _may_survive(elem: DataElement, options: DeidOptions) -> bool:
    """The allow-list, stated independently of the code under test."""
    tag = int(elem.tag)
    if elem.VR == "UN" or (tag >> 16) % 2 == 1 or (tag >> 16) in range(0x5000, 0x6100):
        return False
    rule = RULES.get(tag)
    if rule is not None:
        return resolve_action(rule, elem.VR, options) in ("K", "KSQ", "C")
    return tag in KEEP


OPTIONS = st.builds(DeidOptions, retain_longitudinal_modified_dates=st.booleans(),
                    retain_patient_characteristics=st.booleans(), clean_descriptors=st.booleans())
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.data_too_large])


@SETTINGS
@given(datasets(), OPTIONS)
def test_no_value_outside_the_allow_list_survives_anywhere(ds, options):
    original = _encode(ds)
    out, report = deidentify(ds, PZ, options)
    data = _encode(out)
    out_paths = dict(_walk(out))
    for path, elem in _walk(ds):
        if elem.VR == "SQ" or _may_survive(elem, options):
            continue
        needle = _needle(elem)
        if needle:
            assert needle not in data, (path, elem.VR)
        else:  # a short value: at its own place it is gone or replaced
            got = out_paths.get(path)
            assert got is None or got.value != elem.value, (path, elem.VR)
    assert _encode(ds) == original  # the input is left untouched
    text = json.dumps(report.to_dict())  # no value reaches the report either
    assert "PHI" not in text and "99999" not in text
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"


def _needle(elem: DataElement) -> bytes | None:
    """The marker bytes to search for; None for values too short to tell apart (DA, AS, US,
    SS, FL, AT), which are checked at their own place instead."""
    value = elem.value
    if elem.VR in ("DA", "AS"):
        return None
    if isinstance(value, bytes):
        return value[:12]
    if isinstance(value, str):
        return value.encode()
    if elem.VR in ("UL", "SL"):
        return struct.pack("<I", value)
    if elem.VR in ("UV", "SV"):
        return struct.pack("<Q", value)
    if elem.VR == "FD":
        return struct.pack("<d", value)
    return None


@SETTINGS
@given(datasets(), OPTIONS)
def test_every_output_attribute_is_on_the_allow_list(ds, options):
    out, _ = deidentify(ds, PZ, options)
    for path, elem in _walk(out):
        tag = int(elem.tag)
        rule = RULES.get(tag)
        assert tag in KEEP or tag in ADDED or (rule is not None and resolve_action(rule, elem.VR, options) != "X"), \
            (path, hex(tag))


def _one_element(tag: int, vr: str, value) -> Dataset:
    ds = Dataset()
    ds.add_new(tag, vr, value)
    return ds


def _in_zeroed_sequence() -> Dataset:
    item = Dataset()
    item.CalibrationDateTime = "20240304101500"  # Z
    item.ClinicalTrialSponsorName = "PHI Sponsor"  # D
    ds = Dataset()
    ds.IssuerOfTheContainerIdentifierSequence = [item]  # Z: a zero-length sequence, no items left
    return ds


@SETTINGS
@given(datasets())
@example(_one_element(0x00720071, "UR", "http://phi.example/00001"))  # D on a UR gave an empty value
@example(_in_zeroed_sequence())  # children of an emptied sequence are checked at the sequence
def test_listed_attributes_get_their_action(ds):
    options = DeidOptions()
    out, _ = deidentify(ds, PZ, options)
    out_elems = dict(_walk(out))
    items = {p + (i,) for p, e in _walk(out) if e.VR == "SQ" for i in range(len(e.value))}
    for path, elem in _walk(ds):
        rule = RULES.get(int(elem.tag))
        parent_kept = all(path[:i] in items for i in range(2, len(path), 2))  # every enclosing item
        if rule is None or not parent_kept or elem.VR == "UN":
            continue  # parent sequence removed, emptied or replaced: checked at the parent
        action = resolve_action(rule, elem.VR, options)
        got = out_elems.get(path)
        if action == "X":
            assert got is None, (path, rule.name)
        elif action == "Z":
            assert got is not None and not got.value, (path, rule.name)
        elif action == "D" and elem.VR != "SQ":
            assert got is not None and got.value and got.value != elem.value, (path, rule.name)
        elif action == "U" and elem.VR == "UI":
            assert got is not None and got.value == PZ.uid(elem.value), (path, rule.name)


@SETTINGS
@given(datasets())
def test_kept_attributes_survive_unchanged(ds):
    out, _ = deidentify(ds, PZ)
    out_elems = dict(_walk(out))
    for path, elem in _walk(ds):
        if len(path) == 1 and int(elem.tag) in KEEP and int(elem.tag) not in ADDED and elem.VR not in ("SQ", "UN"):
            assert out_elems[path].value == elem.value, path


@SETTINGS
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
    assert not report.removed


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


@SETTINGS
@given(datasets(), OPTIONS)
def test_deterministic(ds, options):
    a, ra = deidentify(ds, PZ, options)
    b, rb = deidentify(ds, PZ, options)
    assert _encode(a) == _encode(b) and ra == rb


def _values(ds: Dataset) -> dict:
    return {path: (elem.VR, elem.value) for path, elem in _walk(ds) if elem.VR != "SQ"}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets(), OPTIONS)
def test_a_parsed_stream_gets_the_same_result_as_the_dataset_it_encodes(ds, options):
    """Kept elements of a parsed stream pass through undecoded: the result must match the
    element-by-element path, value for value, at every depth (UN elements excepted: a parsed
    stream gives them their dictionary VR, which the in-memory element does not have)."""
    for path, elem in _walk(ds):
        if elem.VR == "UN":
            return
    a, ra = deidentify(dcmread(io.BytesIO(_encode(ds)), force=True), PZ, options)
    fresh, rf = deidentify(ds, PZ, options)
    assert ra == rf
    reread = dcmread(io.BytesIO(_encode(a)), force=True)
    assert _values(reread) == _values(dcmread(io.BytesIO(_encode(fresh)), force=True))


def test_patient_token_accession_and_dates(pz):
    import datetime as dt

    ds = Dataset()
    ds.PatientID, ds.IssuerOfPatientID, ds.PatientName = "MRN1234567 ", "site-a", "Doe^Jane"
    ds.AccessionNumber = "ACC42"
    ds.StudyDate, ds.StudyTime, ds.InstanceCreationDate = "20240304", "081500", "20240304"
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge, ds.PatientWeight = "19700101", "F", "054Y", "70"
    ds.PerformedProcedureStepStartDateTime = "20240304081500.123+0100"  # DT with a time zone
    ds.add_new(0x00181012, "DA", "20240304")  # Date of Secondary Capture
    ds.add_new(0x00080201, "SH", "+0100")  # Timezone Offset From UTC

    out, report = deidentify(ds, pz, DeidOptions())
    assert out.PatientID == report.patient_token == pz.patient("MRN1234567") and len(out.PatientID) == 64
    assert "IssuerOfPatientID" not in out and not out.PatientName
    assert out.AccessionNumber == report.accession_pseudonym == pz.accession("ACC42")
    assert not out.StudyDate and "InstanceCreationDate" not in out and "PatientAge" not in out
    assert 0x00181012 not in out and 0x00080201 not in out
    assert out.LongitudinalTemporalInformationModified == "REMOVED"

    out, report = deidentify(ds, pz, DeidOptions(retain_longitudinal_modified_dates=True,
                                                retain_patient_characteristics=True))
    shift = pz.date_shift(report.patient_token)
    assert report.date_shift_days == shift and 1 <= shift <= 3650
    expected = (dt.date(2024, 3, 4) - dt.timedelta(days=shift)).strftime("%Y%m%d")
    assert out.StudyDate == out.InstanceCreationDate == out[0x00181012].value == expected
    assert out.StudyTime == "081500"  # times of day survive a whole-day shift
    assert out.PerformedProcedureStepStartDateTime == expected + "081500.123+0100"
    assert out[0x00080201].value == "+0100"
    assert out.PatientSex == "F" and out.PatientAge == "054Y" and out.PatientWeight == 70
    assert not out.PatientBirthDate  # not retained by either option
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == ["113100", "113107", "113108"]


@pytest.mark.parametrize("vr, value", [("DA", "2024"), ("DA", "20240304 (Mon)"), ("DA", "20241304"),
                                       ("DT", "2024"), ("DT", "202403041015XYZ"), ("TM", "late morning")])
def test_dates_that_cannot_be_moved_are_removed(pz, vr, value):
    tag = {"DA": 0x00080020, "DT": 0x0008002A, "TM": 0x00080030}[vr]
    ds = Dataset()
    ds.add(DataElement(tag, vr, value))
    out, report = deidentify(ds, pz, DeidOptions(retain_longitudinal_modified_dates=True))
    assert tag not in out and report.removed["uncleanable-text"] == 1


def test_no_patient_id_gets_a_per_study_token(pz):
    a, b = Dataset(), Dataset()
    a.StudyInstanceUID, b.StudyInstanceUID = "1.2.3", "1.2.4"
    (oa, ra), (_, rb) = deidentify(a, pz), deidentify(b, pz)
    assert ra.patient_id_missing and ra.patient_token != rb.patient_token
    assert oa.PatientID == ra.patient_token


def test_crafted_leaks_of_the_deny_list_are_removed_and_counted(pz):
    """What came through the old deny-list: newer rows of the table, an unknown public tag
    (UN), a date in an LO the table does not list, a retired attribute. Against the code
    before the allow-list (c1ffc7f), every one of these values was in the output."""
    ds = Dataset()
    ds.PatientID, ds.Rows, ds.Modality = "MRN1", 512, "CT"
    ds.StationAETitle = "WARD7_DOE"
    ds.add_new(0x00120041, "LO", "TRIAL-ISSUER-DOE")  # Issuer of Clinical Trial Subject ID
    ds.add_new(0x40080040, "SH", "RES-DOE")  # Results ID (retired, listed)
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "X1", "99LOCAL", "Doe family clan"
    ds.EthnicGroupCodeSequence = Sequence([code])
    ds.add_new(0x00100033, "LO", "1385/01/14")  # Patient's Birth Date in Alternative Calendar
    ds.add_new(0x00701234, "UN", b"UNKNOWN-DOE ")  # public, in no dictionary
    ds.add_new(0x00181030, "LO", "PROTO-DOE")  # Protocol Name
    ds.add_new(0x00080010, "SH", "RECOG-DOE")  # Recognition Code (retired)
    ds.add_new(0x00400254, "LO", "PPS DOE")  # Performed Procedure Step Description
    out, report = deidentify(ds, pz)
    assert b"DOE" not in _encode(out) and b"1385" not in _encode(out)
    assert out.Rows == 512 and out.Modality == "CT"
    assert report.removed["unknown-public"] == 1 and report.removed["retired"] == 1
    assert report.removed["not-allowed"] == 1


def test_strings_of_the_keep_list_holding_a_date_are_removed(pz):
    ds = Dataset()
    ds.Manufacturer, ds.BodyPartExamined, ds.SoftwareVersions = "ACME", "19700101", "build 12/03/2024"
    out, report = deidentify(ds, pz)
    assert out.Manufacturer == "ACME" and "BodyPartExamined" not in out and "SoftwareVersions" not in out
    assert report.removed["date-in-text"] == 2


def test_clean_descriptors_keeps_vocabulary_only(pz):
    ds = Dataset()
    ds.StudyDescription = "CT CHEST W/O CONTRAST 12/03/2024 DR SMITH"
    ds.SeriesDescription = "John Doe 1234567"
    out, report = deidentify(ds, pz, DeidOptions(clean_descriptors=True))
    assert out.StudyDescription.split() == ["CT", "CHEST", "W", "CONTRAST", "DR"]
    assert "SeriesDescription" not in out and report.removed["uncleanable-text"] == 1
    assert "113105" in report.method_codes
    plain, _ = deidentify(ds, pz)
    assert "StudyDescription" not in plain  # the Basic Profile removes descriptors


def test_retain_safe_private_keeps_only_listed_creator_elements(pz):
    ds = Dataset()
    block = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    block.add_new(0x8B, "DS", "1.5")  # kept: on the list
    block.add_new(0x8C, "LO", "OPERATOR DOE")  # not on the list
    other = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    other.add_new(0x10, "OB", b"PHIBLOB ")
    safe = frozenset({("GEMS_ACQU_01", 0x8B)})
    out, report = deidentify(ds, pz, DeidOptions(safe_private=safe))
    assert out[0x0019108B].value == "1.5" and out[0x00190010].value == "GEMS_ACQU_01"
    assert 0x0019108C not in out and 0x00290010 not in out and 0x00291010 not in out
    assert report.removed["private"] == 3 and "113111" in report.method_codes
    plain, _ = deidentify(ds, pz)
    assert not any(int(t) >> 16 == 0x0019 for t in plain.keys())


def test_keep_unlisted_is_the_old_deny_list_reading(pz):
    ds = Dataset()
    ds.Manufacturer = "ACME"
    ds.add_new(0x00701234, "LO", "UNKNOWN")  # unknown public: kept under the old reading
    ds.add_new(0x00081070, "PN", "Doe^John")  # Operators' Name: listed, removed either way
    ds.add_new(0x00400244, "DA", "20240304")  # Performed Procedure Step Start Date
    out, report = deidentify(ds, pz, DeidOptions(keep_unlisted=True))
    assert out[0x00701234].value == "UNKNOWN" and 0x00081070 not in out
    assert "unlisted kept" in out.DeidentificationMethod
    strict, _ = deidentify(ds, pz)
    assert 0x00701234 not in strict and "allow-list" in strict.DeidentificationMethod


def _item(value_type: str, **values) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", value_type
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
    item.ConceptNameCodeSequence = Sequence([name])
    for key, value in values.items():
        setattr(item, key, value)
    return item


def test_structured_report_keeps_coded_content_and_drops_text_and_names(pz):
    num = _item("NUM")
    measured = Dataset()
    measured.NumericValue = "12.5"
    unit = Dataset()
    unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "mm", "UCUM", "mm"
    measured.MeasurementUnitsCodeSequence = Sequence([unit])
    num.MeasuredValueSequence = Sequence([measured])
    container = _item("CONTAINER", ContinuityOfContent="SEPARATE")
    container.ContentSequence = Sequence([_item("TEXT", TextValue="Patient John Doe, MRN 1234567"),
                                         _item("PNAME", PersonName="Smith^Anna"), num,
                                         _item("DATE", Date="20240304")])
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    ds.ValueType = "CONTAINER"
    ds.ContentSequence = Sequence([container, _item("TEXT", TextValue="Dr Smith dictated")])
    out, report = deidentify(ds, pz)
    data = _encode(out)
    assert b"Doe" not in data and b"Smith" not in data and b"20240304" not in data
    kept = out.ContentSequence
    assert [i.ValueType for i in kept] == ["CONTAINER"]
    assert [i.ValueType for i in kept[0].ContentSequence] == ["NUM", "DATE"]
    assert kept[0].ContentSequence[0].MeasuredValueSequence[0].NumericValue == 12.5
    assert report.removed["structured-text"] == 2 and report.removed["structured-name"] == 1


def test_undecodable_kept_element_is_refused_by_tag_without_value(pz):
    ds = Dataset()
    ds.PatientID = "X"
    bad = b"\x28\x00\x10\x00US\x01\x00\x01"  # (0028,0010) Rows: one byte where US needs two
    read = dcmread(io.BytesIO(_encode(ds) + bad), force=True)
    with pytest.raises(DeidError, match=r"\(0028,0010\)"):
        deidentify(read, pz)


def test_kept_elements_pass_byte_for_byte_and_removed_ones_are_never_decoded(pz):
    ds = Dataset()
    ds.PatientID, ds.Manufacturer, ds.Rows = "X", "ACME  MODEL^7", 512
    item = Dataset()
    item.add_new(0x00280011, "US", 256)
    ds.add_new(0x00081115, "SQ", Sequence([item]))  # Referenced Series Sequence: kept, filtered inside
    ds.add_new(0x00189999, "US", 7)  # not allowed: removed
    raw = _encode(ds)
    out, _ = deidentify(dcmread(io.BytesIO(raw), force=True), pz)
    assert b"ACME  MODEL^7" in _encode(out) and out.Rows == 512 and out[0x00081115][0].Columns == 256
    # (0018,9999) with three bytes where US needs two: removed unread, so no refusal
    at = raw.index(b"\x18\x00\x99\x99US\x02\x00")
    junk = raw[:at] + b"\x18\x00\x99\x99US\x03\x00\x00\x01\x02" + raw[at + 10:]
    out, report = deidentify(dcmread(io.BytesIO(junk), force=True), pz)
    assert 0x00189999 not in out and report.removed
