"""The Annex E table as read from its maintained source, the option columns derived from
it, and the keep list beside it."""

from __future__ import annotations

import pytest
from pydicom.datadict import dictionary_has_tag, dictionary_is_retired, dictionary_VR, keyword_for_tag

from edge_agent.annex_e import (
    ACTIONS,
    EDITION,
    PRIVATE_RULE,
    ROW_COUNT,
    RULES,
    is_curve,
    is_descriptor,
    is_overlay,
    rule_for,
    source_rows,
)
from edge_agent.keep_list import CLASS_UIDS, KEEP, KEEP_MODULES


def test_every_row_of_the_source_edition_has_the_same_action_here():
    plain, masked = source_rows(EDITION)
    assert EDITION == "2026c" and len(plain) + len(masked) == ROW_COUNT == 655
    assert set(plain) == set(RULES)
    for tag, action in plain.items():
        assert RULES[tag].basic == action, hex(tag)
        assert action in ACTIONS
    # the repeating groups: curves, overlay data and overlay comments, all removed
    assert sorted(masked) == sorted([(0x5000, 0x0000, 0xFF00, 0x0000, "X"), (0x6000, 0x3000, 0xFF00, 0xFFFF, "X"),
                                     (0x6000, 0x4000, 0xFF00, 0xFFFF, "X")])


def test_the_current_edition_has_what_the_hand_copy_missed():
    """Rows the 2023 hand copy (459 rows) lacked, which crafted instances leaked through."""
    for keyword in ("StationAETitle", "IssuerOfClinicalTrialSubjectID", "ResultsID", "EthnicGroupCodeSequence"):
        tag = next(t for t in RULES if keyword_for_tag(t) == keyword)
        assert RULES[tag].basic == "X", keyword


def test_well_known_rows():
    expect = {0x00100010: "Z", 0x00100020: "Z/D", 0x00100030: "Z", 0x00080050: "Z", 0x00080018: "U",
              0x0020000D: "U", 0x0020000E: "U", 0x00080080: "X/Z/D", 0x00081140: "X/Z/U*",
              0x0040A730: "D", 0x00101010: "X", 0x00080090: "Z", 0xFFFAFFFA: "X", 0x00420011: "D"}
    for tag, action in expect.items():
        assert RULES[tag].basic == action, hex(tag)


def test_longitudinal_option_column():
    """Every date, time and date-time of the table is cleaned under the option, except the
    birth date and time and the GPS time stamp; the time zone offset is kept."""
    cleaned = {t for t, r in RULES.items() if r.longitudinal_modified_dates}
    for tag in RULES:
        vr = dictionary_VR(tag) if dictionary_has_tag(tag) else None
        if tag in (0x00100030, 0x00100032, 0x00160077):
            assert tag not in cleaned
        elif vr in ("DA", "DT", "TM"):
            assert tag in cleaned, hex(tag)
    assert 0x00080201 in cleaned and 0x00080020 in cleaned and 0x0008002A in cleaned
    assert all(RULES[t].longitudinal_modified_dates == "C" for t in cleaned)


def test_patient_characteristics_and_descriptor_columns():
    kept = {keyword_for_tag(t): r.patient_characteristics for t, r in RULES.items() if r.patient_characteristics}
    assert kept["PatientSex"] == kept["PatientAge"] == kept["PatientWeight"] == kept["EthnicGroupCodeSequence"] == "K"
    assert kept["Allergies"] == "C" and "PatientBirthDate" not in kept and "PatientName" not in kept
    descriptors = {keyword_for_tag(t) for t, r in RULES.items() if r.clean_descriptors}
    assert {"StudyDescription", "SeriesDescription", "ImageComments", "ProtocolName",
            "AdditionalPatientHistory", "ReasonForStudy"} <= descriptors
    # names, identifiers and addresses are never descriptors
    assert not descriptors & {"PatientName", "PatientID", "PatientAddress", "InstitutionName",
                              "IdentifyingComments", "StationName", "OperatorsName"}
    assert all(is_descriptor(t) for t, r in RULES.items() if r.clean_descriptors)


def test_repeating_groups_and_private():
    assert rule_for(0x00291010) is PRIVATE_RULE and rule_for(0x7FE10010) is PRIVATE_RULE
    assert rule_for(0x60003000).name == "Overlay Data" and rule_for(0x601E4000).name == "Overlay Comments"
    assert is_overlay(0x60020010) and not is_overlay(0x60010010) and is_curve(0x50000010)
    assert rule_for(0x50043000).name == "Curve Data"
    assert rule_for(0x00280010) is None  # Rows: not in the table (the keep list has it)


@pytest.mark.parametrize("tag", sorted(KEEP), ids=lambda t: keyword_for_tag(t))
def test_keep_list_holds_no_identity(tag):
    """Every attribute the keep list names is public, current, not a name/date/time, a class
    UID if a UID, no free text, and not a row of the table (whose action wins)."""
    assert dictionary_has_tag(tag) and not dictionary_is_retired(tag)
    vr = dictionary_VR(tag)
    assert vr not in ("PN", "DA", "DT", "TM", "ST", "LT", "UT", "UN")
    assert vr != "UI" or tag in CLASS_UIDS
    assert tag not in RULES
    assert tag >> 16 not in (0x0002,) and (tag >> 16) % 2 == 0


def test_keep_list_names_the_image_essentials():
    names = {keyword_for_tag(t) for t in KEEP}
    assert {"Rows", "Columns", "BitsAllocated", "PixelData", "PhotometricInterpretation", "Modality",
            "PixelSpacing", "ImagePositionPatient", "RescaleSlope", "WindowCenter", "KVP",
            "RepetitionTime", "NumberOfFrames", "SOPClassUID", "CodeValue"} <= names
    assert sum(len(v) for v in KEEP_MODULES.values()) >= len(KEEP)
