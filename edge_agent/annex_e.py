"""DICOM PS3.15 Annex E, Table E.1-1 (Basic Application Level Confidentiality Profile), as
data read from a maintained source, not a hand copy.

The Basic Profile column comes from ``dicom-anonymizer``'s copy of the table
(:data:`EDITION`: every tagged row, the repeating groups of curves and overlays, and the
compound actions). ``tests/edge_agent/test_annex_e.py`` checks every row of that source
against :data:`RULES`.

The source carries the Basic Profile column only. The option columns MedChain offers are
derived here from rules that state how the standard fills them, each checked by tests:

* Retain Longitudinal Temporal Information with Modified Dates (``C``): every date, time and
  date-time attribute of the table (VR DA, DT or TM), except the patient's birth date and
  time and the GPS time stamp, which the standard leaves out of the option; plus Timezone
  Offset From UTC and Frame Origin Timestamp, which it puts in;
* Retain Patient Characteristics (``K`` keep, ``C`` clean): the short list the standard
  names (:data:`PATIENT_CHARACTERISTICS`);
* Clean Descriptors (``C``): the table's free-text descriptions, comments, histories,
  diagnoses and reasons (:func:`is_descriptor`): text whose purpose is to describe, as
  opposed to names, identifiers, addresses and labels, which the option does not retain.

Action codes (PS3.15 E.1.1): D dummy value, Z zero length (or dummy), X remove, K keep
(sequences are still cleaned inside), C clean, U replace UID consistently; compound codes
(``X/Z``, ``X/D``, ``X/Z/D``, ``Z/D``, ``X/Z/U*``) let a de-identifier keep IOD conformance.
How each is resolved lives in :mod:`edge_agent.deid`: this module is the table and nothing
else.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import MappingProxyType

from pydicom.datadict import dictionary_description, dictionary_has_tag, dictionary_VR, keyword_for_tag

__all__ = ["Rule", "RULES", "EDITION", "SOURCE", "ROW_COUNT", "PRIVATE_RULE", "rule_for", "is_curve",
           "is_overlay", "ACTIONS", "PATIENT_CHARACTERISTICS", "is_descriptor", "source_rows"]

ACTIONS = ("D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*")
EDITION = "2026c"
SOURCE = f"dicom-anonymizer: dicomanonymizer.dicom_anonymization_databases.dicomfields_{EDITION}"

# the source's lists, one per Basic Profile action
_CATEGORIES = MappingProxyType({
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*",
})


@dataclass(frozen=True)
class Rule:
    tag: int | None  # None for a repeating-group row
    name: str
    basic: str  # Basic Profile action
    longitudinal_modified_dates: str = ""  # "" when the option does not change the action
    patient_characteristics: str = ""
    clean_descriptors: str = ""


def source_rows(edition: str = EDITION) -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    """The source's rows of one edition: ``{tag: basic action}`` for plain tags and
    ``(group, element, group mask, element mask, action)`` for repeating groups. Raises
    ``ValueError`` when a tag is listed under two actions."""
    module = importlib.import_module(f"dicomanonymizer.dicom_anonymization_databases.dicomfields_{edition}")
    plain: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, action in _CATEGORIES.items():
        for row in getattr(module, category):
            if len(row) == 4:
                masked.append((*row, action))
                continue
            tag = (row[0] << 16) | row[1]
            if plain.get(tag, action) != action:
                raise ValueError(f"Annex E {edition}: ({row[0]:04X},{row[1]:04X}) listed as "
                                 f"{plain[tag]} and {action}")
            plain[tag] = action
    return plain, masked


# Retain Patient Characteristics Option, by keyword (PS3.15 E.3.7): K keep, C clean. The
# Ethnic Group Code Sequence and Ethnic Groups rows joined the table after 2023.
PATIENT_CHARACTERISTICS = MappingProxyType({
    "PatientAge": "K", "PatientSex": "K", "PatientSexNeutered": "K", "PatientSize": "K",
    "PatientWeight": "K", "EthnicGroup": "K", "EthnicGroupCodeSequence": "K", "PregnancyStatus": "K",
    "SmokingStatus": "K", "Allergies": "C", "PatientState": "C", "PreMedication": "C", "SpecialNeeds": "C",
})
_ETHNIC_GROUPS = 0x00102162  # Ethnic Groups (UC): newer than the dictionaries we can rely on

_NOT_LONGITUDINAL = frozenset({0x00100030, 0x00100032, 0x00160077})  # birth date/time, GPS time stamp
_LONGITUDINAL_EXTRA = frozenset({0x00080201, 0x00340007})  # timezone offset, frame origin timestamp

_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC"})
_DESCRIPTOR_WORDS = ("Description", "Comment", "History", "Diagnos", "Reason", "Impressions",
                     "Findings", "Purpose", "ProtocolName")
_NOT_DESCRIPTOR_WORDS = ("Identifying",)  # Identifying Comments: identifying by definition


def is_descriptor(tag: int) -> bool:
    """A free-text attribute that describes (a study, a series, a procedure, a history): the
    kind the Clean Descriptors Option retains once cleaned."""
    try:
        vr, keyword = dictionary_VR(tag), keyword_for_tag(tag)
    except KeyError:
        return False
    return (vr in _TEXT_VRS and any(word in keyword for word in _DESCRIPTOR_WORDS)
            and not any(word in keyword for word in _NOT_DESCRIPTOR_WORDS))


def _name(tag: int) -> str:
    return dictionary_description(tag) if dictionary_has_tag(tag) else f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _longitudinal(tag: int) -> str:
    if tag in _LONGITUDINAL_EXTRA:
        return "C"
    try:
        temporal = dictionary_VR(tag) in ("DA", "DT", "TM")
    except KeyError:
        return ""
    return "C" if temporal and tag not in _NOT_LONGITUDINAL else ""


def _characteristics(tag: int) -> str:
    if tag == _ETHNIC_GROUPS:
        return "K"
    return PATIENT_CHARACTERISTICS.get(keyword_for_tag(tag), "") if dictionary_has_tag(tag) else ""


def _build() -> tuple[dict[int, Rule], list[tuple[int, int, int, int, str]]]:
    plain, masked = source_rows()
    rules = {tag: Rule(tag, _name(tag), action, _longitudinal(tag), _characteristics(tag),
                       "C" if is_descriptor(tag) else "")
             for tag, action in sorted(plain.items())}
    return rules, masked


_RULES, _MASKED = _build()
RULES: MappingProxyType[int, Rule] = MappingProxyType(_RULES)
ROW_COUNT = len(_RULES) + len(_MASKED)

PRIVATE_RULE = Rule(None, "Private attributes", "X")
CURVE_RULE = Rule(None, "Curve Data", "X")
OVERLAY_DATA_RULE = Rule(None, "Overlay Data", "X")
OVERLAY_COMMENTS_RULE = Rule(None, "Overlay Comments", "X")


def is_curve(tag: int) -> bool:
    """Curve groups (50xx,xxxx), retired but still found in old files."""
    group = tag >> 16
    return 0x5000 <= group <= 0x501E and group % 2 == 0


def is_overlay(tag: int) -> bool:
    group = tag >> 16
    return 0x6000 <= group <= 0x601E and group % 2 == 0


def rule_for(tag: int) -> Rule | None:
    """The table's rule for a tag, or None when the profile does not list it."""
    rule = _RULES.get(tag)
    if rule is not None:
        return rule
    if (tag >> 16) % 2 == 1:
        return PRIVATE_RULE
    if is_curve(tag):
        return CURVE_RULE
    if is_overlay(tag):
        element = tag & 0xFFFF
        if element == 0x3000:
            return OVERLAY_DATA_RULE
        if element == 0x4000:
            return OVERLAY_COMMENTS_RULE
    return None
