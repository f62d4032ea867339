"""The Annex E table as data: complete, consistent with the DICOM dictionary."""

from __future__ import annotations

from pydicom.datadict import dictionary_description, dictionary_has_tag

from edge_agent.annex_e import ACTIONS, PRIVATE_RULE, ROW_COUNT, RULES, is_curve, is_overlay, rule_for


def _norm(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum())


def test_every_row_is_a_known_attribute_with_its_standard_name():
    assert ROW_COUNT == 459 and len(RULES) == 456  # + curve data, overlay data and comments rows
    for tag, rule in RULES.items():
        assert dictionary_has_tag(tag), rule.name
        assert _norm(dictionary_description(tag))[:10] == _norm(rule.name)[:10], (hex(tag), rule.name)
        assert rule.basic in ACTIONS
        assert rule.longitudinal_modified_dates in ("", "C")
        assert rule.patient_characteristics in ("", "K", "C")


def test_well_known_rows():
    expect = {0x00100010: "Z", 0x00100020: "Z", 0x00100030: "Z", 0x00080050: "Z", 0x00080018: "U",
              0x0020000D: "U", 0x0020000E: "U", 0x00080080: "X/Z/D", 0x00081140: "X/Z/U*",
              0x0040A730: "D", 0x00101010: "X", 0x00080090: "Z", 0xFFFAFFFA: "X"}
    for tag, action in expect.items():
        assert RULES[tag].basic == action, hex(tag)
    assert RULES[0x00080020].longitudinal_modified_dates == "C"
    assert RULES[0x00101010].patient_characteristics == "K"


def test_repeating_groups_and_private():
    assert rule_for(0x00291010) is PRIVATE_RULE and rule_for(0x7FE10010) is PRIVATE_RULE
    assert rule_for(0x60003000).name == "Overlay Data" and rule_for(0x601E4000).name == "Overlay Comments"
    assert is_overlay(0x60020010) and not is_overlay(0x60010010) and is_curve(0x50000010)
    assert rule_for(0x50043000).name == "Curve Data"
    assert rule_for(0x00280010) is None  # Rows: not listed, kept
